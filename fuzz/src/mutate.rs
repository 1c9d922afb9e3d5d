//! Mutators: byte-level, JSON-tree and TOML-line, plus random JSON values.

use crate::engine::{InputKind, Target};
use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Map, Value};

/// Numbers at the edges of the integer types and of what JSON parsers do.
pub const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "3",
    "4",
    "5",
    "7",
    "20",
    "64",
    "127",
    "128",
    "255",
    "256",
    "500",
    "501",
    "1000",
    "65535",
    "65536",
    "262144",
    "4194304",
    "52428800",
    "52428801",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "-9223372036854775809",
    "0.5",
    "1e308",
    "1e999",
    "-1e999",
    "1e-999",
    "123456789012345678901234567890",
];

/// Strings that tend to find edge cases.
pub const STRINGS: &[&str] = &[
    "",
    " ",
    "0",
    "a",
    "null",
    "default",
    "primary",
    "Primary",
    "\u{e9}",
    "\u{1f600}",
    "\u{0}",
    "\n",
    "\\",
    "\"",
    ":",
    "::",
    "a:b:c",
    "Bncr:qq:0:1",
    "bncr:",
    "../x",
    ".hidden",
    "/",
    "SIGUSR1",
    "SIGHUP",
    "operator.admin",
    "req",
    "text",
];

/// Tokens that break or build JSON and TOML structure.
const TOKENS: &[&str] = &[
    "{", "}", "[", "]", "\"", ",", ":", "\\", "\\u", "\\ud800", "\n", "=", ".", "[[", "]]", "'",
    "'''", "\"\"\"", "#", "null", "true", "false", "{}", "[]", "\"\"",
];

/// Values to put after `=` in a TOML line.
const TOML_VALUES: &[&str] = &[
    "0",
    "-1",
    "9223372036854775807",
    "1.5",
    "nan",
    "inf",
    "true",
    "\"x\"",
    "\"\"",
    "''",
    "[]",
    "[\"\"]",
    "[1, \"a\"]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    "\"SIGKILL\"",
    "\"close\"",
    "\"none\"",
    "\"0.0.0.0\"",
    "\"::1\"",
    "65536",
    "65535",
];

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A random JSON value of at most `depth` levels, drawing names from `dict`.
pub fn value(rng: &mut StdRng, dict: &[&str], depth: u32) -> Value {
    let choice = if depth == 0 {
        rng.random_range(0..4)
    } else {
        rng.random_range(0..6)
    };
    match choice {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => number(rng),
        3 => Value::String(string(rng, dict)),
        4 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| value(rng, dict, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..5) {
                m.insert(string(rng, dict), value(rng, dict, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// A number from [`NUMBERS`] (as a JSON number, when it is one).
pub fn number(rng: &mut StdRng) -> Value {
    let text = if rng.random_ratio(1, 4) {
        rng.random::<i64>().to_string()
    } else {
        pick(rng, NUMBERS).to_string()
    };
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A string from the dictionary or [`STRINGS`], sometimes long or random.
pub fn string(rng: &mut StdRng, dict: &[&str]) -> String {
    match rng.random_range(0..10) {
        0..=4 if !dict.is_empty() => pick(rng, dict).to_string(),
        5 => "x".repeat(rng.random_range(100..400)),
        6 => (0..rng.random_range(1..12))
            .map(|_| char::from_u32(rng.random_range(0x20..0x2ff)).unwrap_or('?'))
            .collect(),
        _ => pick(rng, STRINGS).to_string(),
    }
}

/// Mutate `input` one to four times. `corpus` supplies splice partners.
pub fn mutate(input: &[u8], corpus: &[Vec<u8>], target: &Target, rng: &mut StdRng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let structured = rng.random_ratio(1, 2);
        out = match (structured, target.kind) {
            (true, InputKind::Json) => json_tree(&out, target.dictionary, rng).unwrap_or(out),
            (true, InputKind::LineThenJson) => line_then_json(&out, target.dictionary, rng),
            (true, InputKind::Toml) => toml_lines(&out, target.dictionary, rng),
            (false, _) => bytes(&out, corpus, target.dictionary, rng),
        };
    }
    out
}

/// Byte-level mutations.
fn bytes(input: &[u8], corpus: &[Vec<u8>], dict: &[&str], rng: &mut StdRng) -> Vec<u8> {
    let mut v = input.to_vec();
    let at = |rng: &mut StdRng, v: &Vec<u8>| rng.random_range(0..=v.len());
    match rng.random_range(0..9) {
        0 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] ^= 1 << rng.random_range(0..8);
        }
        1 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] = rng.random();
        }
        2 => {
            let i = at(rng, &v);
            let token = if rng.random_ratio(1, 2) && !dict.is_empty() {
                format!("\"{}\"", pick(rng, dict))
            } else {
                pick(rng, TOKENS).to_string()
            };
            v.splice(i..i, token.into_bytes());
        }
        3 if !v.is_empty() => {
            let a = rng.random_range(0..v.len());
            let b = rng.random_range(a..=v.len().min(a + 16));
            v.drain(a..b);
        }
        4 if !v.is_empty() => {
            let a = rng.random_range(0..v.len());
            let b = rng.random_range(a..=v.len().min(a + 64));
            let chunk = v[a..b].to_vec();
            let i = at(rng, &v);
            v.splice(i..i, chunk);
        }
        5 => {
            let i = at(rng, &v);
            v.truncate(i);
        }
        6 => replace_number(&mut v, rng),
        7 if !corpus.is_empty() => {
            let other = pick(rng, corpus);
            let i = at(rng, &v);
            let j = rng.random_range(0..=other.len());
            v.truncate(i);
            v.extend_from_slice(&other[j..]);
        }
        _ => {
            let i = at(rng, &v);
            let s = string(rng, dict);
            v.splice(i..i, s.into_bytes());
        }
    }
    v
}

/// Replace one run of digits with a boundary number.
fn replace_number(v: &mut Vec<u8>, rng: &mut StdRng) {
    let starts: Vec<usize> = (0..v.len())
        .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let a = *pick(rng, &starts);
    let mut b = a;
    while b < v.len() && v[b].is_ascii_digit() {
        b += 1;
    }
    v.splice(a..b, pick(rng, NUMBERS).bytes());
}

/// Mutate a JSON document as a tree; `None` when it does not parse.
fn json_tree(input: &[u8], dict: &[&str], rng: &mut StdRng) -> Option<Vec<u8>> {
    let mut root: Value = serde_json::from_slice(input).ok()?;
    let mut node = &mut root;
    // Walk down a random path.
    loop {
        let descend = rng.random_ratio(2, 3);
        let next_index = match node {
            Value::Object(m) if descend && !m.is_empty() => Some(rng.random_range(0..m.len())),
            Value::Array(a) if descend && !a.is_empty() => Some(rng.random_range(0..a.len())),
            _ => None,
        };
        let Some(i) = next_index else { break };
        node = match node {
            Value::Object(m) => m.values_mut().nth(i)?,
            Value::Array(a) => &mut a[i],
            _ => break,
        };
    }
    match rng.random_range(0..6) {
        0 => *node = value(rng, dict, 2),
        1 => *node = number(rng),
        2 => *node = Value::String(string(rng, dict)),
        3 => match node {
            Value::Object(m) => {
                if !m.is_empty() && rng.random_ratio(1, 3) {
                    let k = m.keys().nth(rng.random_range(0..m.len()))?.clone();
                    m.remove(&k);
                } else {
                    m.insert(string(rng, dict), value(rng, dict, 1));
                }
            }
            Value::Array(a) => a.push(value(rng, dict, 1)),
            other => *other = Value::Array(vec![other.take()]),
        },
        4 => {
            // Deep nesting, around the parsers' recursion limits.
            let depth = *pick(rng, &[2usize, 16, 126, 127, 128, 129, 200]);
            let mut v = node.take();
            for _ in 0..depth {
                v = if rng.random() {
                    Value::Array(vec![v])
                } else {
                    let mut m = Map::new();
                    m.insert("a".into(), v);
                    Value::Object(m)
                };
            }
            *node = v;
        }
        _ => *node = Value::Null,
    }
    serde_json::to_vec(&root).ok()
}

/// Mutate the first line (a name) or the JSON after it.
fn line_then_json(input: &[u8], dict: &[&str], rng: &mut StdRng) -> Vec<u8> {
    let split = input
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(input.len());
    let (head, rest) = input.split_at(split);
    let rest = rest.get(1..).unwrap_or_default();
    let (head, rest) = if rng.random_ratio(1, 4) {
        (string(rng, dict).into_bytes(), rest.to_vec())
    } else {
        let body = json_tree(rest, dict, rng).unwrap_or_else(|| rest.to_vec());
        (head.to_vec(), body)
    };
    let mut out = head;
    out.push(b'\n');
    out.extend(rest);
    out
}

/// Line-wise TOML mutations.
fn toml_lines(input: &[u8], dict: &[&str], rng: &mut StdRng) -> Vec<u8> {
    let text = String::from_utf8_lossy(input);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let at = rng.random_range(0..=lines.len());
    match rng.random_range(0..6) {
        0 if !lines.is_empty() => {
            lines.remove(at.min(lines.len() - 1));
        }
        1 if !lines.is_empty() => {
            let l = lines[at.min(lines.len() - 1)].clone();
            lines.insert(at, l);
        }
        2 if !lines.is_empty() => {
            let i = at.min(lines.len() - 1);
            if let Some(eq) = lines[i].find('=') {
                let key = lines[i][..eq].to_string();
                lines[i] = format!("{key}= {}", pick(rng, TOML_VALUES));
            }
        }
        3 => lines.insert(at, format!("[{}]", pick(rng, dict))),
        4 => lines.insert(
            at,
            format!("{} = {}", pick(rng, dict), pick(rng, TOML_VALUES)),
        ),
        _ if lines.len() > 1 => {
            let i = rng.random_range(0..lines.len());
            let j = rng.random_range(0..lines.len());
            lines.swap(i, j);
        }
        _ => {}
    }
    lines.join("\n").into_bytes()
}
