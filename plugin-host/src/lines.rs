//! Reading lines with a length bound, so a plugin cannot make the host
//! buffer without limit.

use std::io;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What one read produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A line is in the buffer (without its `\n` or `\r\n`).
    Line,
    /// The line was longer than the bound. With `discard` the rest of it was
    /// skipped and reading can go on; without, reading stopped at the bound.
    TooLong,
    /// The stream ended.
    Eof,
}

/// Read one line into `buf` (cleared first), holding at most `max` bytes.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    discard: bool,
) -> io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if too_long {
                LineRead::TooLong
            } else if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (chunk_len, used, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (i, i + 1, true),
            None => (avail.len(), avail.len(), false),
        };
        if !too_long {
            if buf.len() + chunk_len > max {
                too_long = true;
                buf.clear();
                if !discard {
                    return Ok(LineRead::TooLong);
                }
            } else {
                buf.extend_from_slice(&avail[..chunk_len]);
            }
        }
        r.consume(used);
        if done {
            if too_long {
                return Ok(LineRead::TooLong);
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(LineRead::Line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounds_lines_at_and_beyond_the_limit() {
        let input = b"abc\r\nabcd\nabcde\nx".to_vec();
        let mut r = tokio::io::BufReader::with_capacity(2, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf, 4, true).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"abc");
        assert_eq!(
            read_line(&mut r, &mut buf, 4, true).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"abcd");
        assert_eq!(
            read_line(&mut r, &mut buf, 4, true).await.unwrap(),
            LineRead::TooLong
        );
        assert_eq!(
            read_line(&mut r, &mut buf, 4, true).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"x");
        assert_eq!(
            read_line(&mut r, &mut buf, 4, true).await.unwrap(),
            LineRead::Eof
        );

        // Without discarding, reading stops as soon as the bound is passed,
        // even if no newline ever comes.
        let flood = [b'a'; 100];
        let mut r = tokio::io::BufReader::with_capacity(8, &flood[..]);
        assert_eq!(
            read_line(&mut r, &mut buf, 16, false).await.unwrap(),
            LineRead::TooLong
        );
        assert!(buf.is_empty());
    }
}
