//! Files both ways. Client-to-gateway transfers are spooled chunk by chunk
//! to disk (never whole in memory) and checked per chunk and per file;
//! gateway-to-client transfers go out in 256 KiB chunks, each waiting for
//! `bncr.file.ack`.

use crate::bridge::{Bridge, Route, inbound_route};
use crate::params::{self, FileAck, FileChunk, FileEnd, FileInit};
use base64::Engine;
use plugin_api::{ConnId, RpcError, Value};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Chunk size of gateway-to-client transfers.
pub(crate) const OUT_CHUNK: u64 = 256 * 1024;
/// Largest chunk a client may send in one request.
pub(crate) const MAX_IN_CHUNK: u64 = 4 * 1024 * 1024;

/// A client-to-gateway transfer in progress.
#[derive(Debug, Clone)]
pub(crate) struct Transfer {
    account: String,
    route: Option<Route>,
    session_key: Option<String>,
    file_name: String,
    mime_type: Option<String>,
    file_size: u64,
    total_chunks: u64,
    file_sha256: Option<String>,
    spool: PathBuf,
    /// chunk index -> (offset, size)
    received: BTreeMap<u64, (u64, u64)>,
    /// The last init or chunk (for `transferTtlMs`).
    touched: Instant,
}

/// How many missing chunk indexes a `bncr.file.complete` error lists.
pub(crate) const MISSING_LISTED: usize = 16;

/// What the client answered to a server-pushed file event.
#[derive(Debug, Clone)]
pub(crate) struct AckResult {
    ok: bool,
    error: Option<String>,
    path: Option<String>,
}

type WaiterKey = (String, String, u64);

/// Waiters for `bncr.file.ack`, by (transferId, stage, chunkIndex).
#[derive(Debug, Default)]
pub(crate) struct OutgoingWaiters(HashMap<WaiterKey, oneshot::Sender<AckResult>>);

impl OutgoingWaiters {
    /// Drop every waiter; each sees a timeout. Returns how many there were.
    pub(crate) fn fail_all(&mut self) -> usize {
        let n = self.0.len();
        self.0.clear();
        n
    }

    /// How many acks are awaited.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Ids end up in file names: letters, digits, `-`, `_`, `.` only.
fn safe_id(id: &str) -> Result<String, RpcError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(id.to_string())
    } else {
        Err(RpcError::invalid_request(
            "transferId must be 1-128 of [A-Za-z0-9._-]",
        ))
    }
}

fn safe_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| if c.is_control() || c == ':' { '_' } else { c })
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        "file".into()
    } else {
        cleaned
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn io_err(what: &str, e: impl std::fmt::Display) -> RpcError {
    RpcError::unavailable(format!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RpcError> + Send + 'static,
) -> Result<T, RpcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err("file task", e))?
}

/// Streaming sha256 and length of a file.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(h.finalize()), len))
}

impl Bridge {
    fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }

    /// Handle `bncr.file.init`.
    pub(crate) async fn file_init(&self, p: FileInit) -> Result<Value, RpcError> {
        let id = safe_id(&params::required(p.transfer_id, "transferId")?)?;
        let account = self.account(p.common.account_id.as_deref())?;
        self.store()?;
        let file_size = p
            .file_size
            .ok_or_else(|| RpcError::invalid_request("fileSize required"))?;
        if file_size > self.cfg.max_file_bytes {
            return Err(RpcError::invalid_request(format!(
                "file too large: {file_size} > {} bytes",
                self.cfg.max_file_bytes
            ))
            .with_details(json!({"code": "file-too-large", "maxBytes": self.cfg.max_file_bytes})));
        }
        let chunk_size = p.chunk_size.unwrap_or(OUT_CHUNK);
        if chunk_size == 0 || chunk_size > MAX_IN_CHUNK {
            return Err(RpcError::invalid_request(format!(
                "chunkSize must be 1..={MAX_IN_CHUNK}"
            )));
        }
        let expected_chunks = file_size.div_ceil(chunk_size).max(1);
        let (min, max_chunks) = (self.cfg.file_min_chunk_bytes, self.cfg.file_max_chunks);
        if expected_chunks > 1 && chunk_size < min {
            self.state().counters.chunking_refused += 1;
            return Err(RpcError::invalid_request(format!(
                "chunkSize {chunk_size} is below the minimum {min} (fileMinChunkBytes)"
            ))
            .with_details(json!({"code": "chunk-too-small", "minChunkBytes": min})));
        }
        if expected_chunks > max_chunks {
            self.state().counters.chunking_refused += 1;
            return Err(RpcError::invalid_request(format!(
                "{expected_chunks} chunks exceed the maximum {max_chunks} (fileMaxChunks)"
            ))
            .with_details(json!({"code": "too-many-chunks", "maxChunks": max_chunks})));
        }
        let total_chunks = p.total_chunks.unwrap_or(expected_chunks);
        if total_chunks != expected_chunks {
            return Err(RpcError::invalid_request(format!(
                "totalChunks {total_chunks} does not match fileSize/chunkSize ({expected_chunks})"
            )));
        }
        let route = if p.platform.is_some() || p.user_id.is_some() {
            Some(inbound_route(&p.platform, &p.group_id, &p.user_id)?)
        } else {
            None
        };
        if self.state().transfers.contains_key(&id) {
            return Ok(json!({"ok": true, "transferId": id, "status": "init", "duplicated": true}));
        }
        self.expire_transfers(Instant::now()).await;
        self.transfer_room(&account)?;
        let spool = self.files_dir().join("spool").join(format!("{id}.part"));
        let sp = spool.clone();
        blocking(move || {
            if let Some(d) = sp.parent() {
                std::fs::create_dir_all(d).map_err(|e| io_err("spool dir", e))?;
            }
            std::fs::File::create(&sp).map_err(|e| io_err("spool", e))?;
            Ok(())
        })
        .await?;
        let t = Transfer {
            account,
            route,
            session_key: p.session_key,
            file_name: safe_file_name(p.file_name.as_deref().unwrap_or("file")),
            mime_type: p.mime_type,
            file_size,
            total_chunks,
            file_sha256: p.file_sha256.map(|s| s.to_ascii_lowercase()),
            spool,
            received: BTreeMap::new(),
            touched: Instant::now(),
        };
        if self.state().transfers.contains_key(&id) {
            return Ok(json!({"ok": true, "transferId": id, "status": "init", "duplicated": true}));
        }
        // Checked again with the spool created: a concurrent init may have
        // taken the last place meanwhile.
        if let Err(e) = self.transfer_room(&t.account) {
            let spool = t.spool;
            let _ = blocking(move || {
                let _ = std::fs::remove_file(spool);
                Ok(())
            })
            .await;
            return Err(e);
        }
        let mut st = self.state();
        st.transfers.insert(id.clone(), t);
        Ok(json!({"ok": true, "transferId": id, "status": "init", "totalChunks": total_chunks}))
    }

    /// Handle `bncr.file.chunk`.
    pub(crate) async fn file_chunk(&self, p: FileChunk) -> Result<Value, RpcError> {
        let id = safe_id(&params::required(p.transfer_id, "transferId")?)?;
        let index = p
            .chunk_index
            .ok_or_else(|| RpcError::invalid_request("chunkIndex required"))?;
        let offset = p
            .offset
            .ok_or_else(|| RpcError::invalid_request("offset required"))?;
        let data = params::required(p.base64, "base64")?;
        let t = self.transfer(&id)?;
        if index >= t.total_chunks {
            return Err(RpcError::invalid_request(format!(
                "chunkIndex {index} out of range (totalChunks {})",
                t.total_chunks
            )));
        }
        if data.len() as u64 > MAX_IN_CHUNK * 4 / 3 + 4 {
            return Err(RpcError::invalid_request("chunk too large"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| RpcError::invalid_request(format!("base64: {e}")))?;
        let size = bytes.len() as u64;
        if p.size.is_some_and(|s| s != size) {
            return Err(RpcError::invalid_request("chunk size mismatch"));
        }
        if offset.checked_add(size).is_none_or(|end| end > t.file_size) {
            return Err(RpcError::invalid_request("chunk beyond fileSize"));
        }
        if let Some(want) = p.chunk_sha256.as_deref()
            && !want.eq_ignore_ascii_case(&sha_hex(&bytes))
        {
            return Err(RpcError::invalid_request("chunk sha256 mismatch")
                .with_details(json!({"code": "chunk-sha256-mismatch", "chunkIndex": index})));
        }
        let spool = t.spool.clone();
        blocking(move || {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&spool)
                .map_err(|e| io_err("spool", e))?;
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| io_err("spool seek", e))?;
            f.write_all(&bytes).map_err(|e| io_err("spool write", e))?;
            Ok(())
        })
        .await?;
        let mut st = self.state();
        let t = st
            .transfers
            .get_mut(&id)
            .ok_or_else(|| RpcError::invalid_request("transfer not found"))?;
        t.received.insert(index, (offset, size));
        t.touched = Instant::now();
        Ok(json!({
            "ok": true, "transferId": id, "chunkIndex": index, "offset": offset,
            "received": t.received.len(), "totalChunks": t.total_chunks,
        }))
    }

    /// The transfer `id` as it stands, or `transfer not found`.
    fn transfer(&self, id: &str) -> Result<Transfer, RpcError> {
        self.state()
            .transfers
            .get(id)
            .cloned()
            .ok_or_else(|| RpcError::invalid_request("transfer not found"))
    }

    /// Handle `bncr.file.complete`.
    pub(crate) async fn file_complete(&self, p: FileEnd) -> Result<Value, RpcError> {
        let id = safe_id(&params::required(p.transfer_id, "transferId")?)?;
        let t = self.transfer(&id)?;
        let missing_count = t.total_chunks - t.received.len() as u64;
        if missing_count > 0 {
            // Bounded: the count and the first few indexes, never the list.
            let first: Vec<u64> = (0..t.total_chunks)
                .filter(|i| !t.received.contains_key(i))
                .take(MISSING_LISTED)
                .collect();
            return Err(RpcError::invalid_request(format!(
                "missing {missing_count} chunks, first {first:?}"
            ))
            .with_details(json!({
                "code": "missing-chunks", "missingCount": missing_count, "missing": first,
            })));
        }
        let covered: u64 = t.received.values().map(|(_, s)| s).sum();
        if covered != t.file_size {
            return Err(RpcError::invalid_request(format!(
                "received {covered} bytes, expected {}",
                t.file_size
            )));
        }
        let dest_dir = self.files_dir().join(&id);
        let dest = dest_dir.join(&t.file_name);
        let (spool, want, dest2) = (t.spool.clone(), t.file_sha256.clone(), dest.clone());
        let max = self.cfg.max_file_bytes;
        let sha = blocking(move || {
            let (sha, len) = hash_file(&spool).map_err(|e| io_err("spool read", e))?;
            if len > max {
                return Err(RpcError::invalid_request("file too large"));
            }
            if let Some(w) = want
                && w != sha
            {
                let _ = std::fs::remove_file(&spool);
                return Err(RpcError::invalid_request("file sha256 mismatch")
                    .with_details(json!({"code": "file-sha256-mismatch"})));
            }
            std::fs::create_dir_all(dest2.parent().unwrap_or(Path::new(".")))
                .map_err(|e| io_err("files dir", e))?;
            std::fs::rename(&spool, &dest2).map_err(|e| io_err("store file", e))?;
            Ok(sha)
        })
        .await;
        let sha = match sha {
            Ok(s) => s,
            Err(e) => {
                if e.details_code() == Some("file-sha256-mismatch") {
                    self.state().transfers.remove(&id);
                }
                return Err(e);
            }
        };
        self.state().transfers.remove(&id);
        tracing::info!(transfer = %id, account = %t.account, size = t.file_size, route = ?t.route.as_ref().map(Route::as_string), "bncr file received");
        Ok(json!({
            "ok": true, "transferId": id, "path": dest, "size": t.file_size,
            "fileName": t.file_name, "mimeType": t.mime_type, "fileSha256": sha,
            "sessionKey": t.session_key,
        }))
    }

    /// Refuse a new transfer for `account` when `maxTransfers` or
    /// `maxTransfersPerAccount` transfers are in progress.
    fn transfer_room(&self, account: &str) -> Result<(), RpcError> {
        let mut st = self.state();
        let total = st.transfers.len();
        let mine = st
            .transfers
            .values()
            .filter(|t| t.account == account)
            .count();
        let (max, per) = (self.cfg.max_transfers, self.cfg.max_transfers_per_account);
        let which = if total >= max {
            ("total", max)
        } else if mine >= per {
            ("account", per)
        } else {
            return Ok(());
        };
        st.counters.transfers_refused += 1;
        drop(st);
        tracing::warn!(
            scope = which.0,
            limit = which.1,
            "bncr file transfer refused: too many in progress"
        );
        Err(RpcError::unavailable(format!(
            "too many file transfers in progress ({} limit {})",
            which.0, which.1
        ))
        .retryable_after(Some(1000))
        .with_details(json!({"code": "transfer-limit", "scope": which.0, "limit": which.1})))
    }

    /// Drop transfers with no init or chunk for `transferTtlMs`, with
    /// their spooled bytes. Returns how many.
    pub(crate) async fn expire_transfers(&self, now: Instant) -> usize {
        let ttl = Duration::from_millis(self.cfg.transfer_ttl_ms);
        let expired: Vec<(String, PathBuf)> = {
            let mut st = self.state();
            let ids: Vec<String> = st
                .transfers
                .iter()
                .filter(|(_, t)| now.saturating_duration_since(t.touched) >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            let out: Vec<_> = ids
                .into_iter()
                .filter_map(|id| st.transfers.remove(&id).map(|t| (id, t.spool)))
                .collect();
            st.counters.transfers_expired += out.len() as u64;
            out
        };
        if expired.is_empty() {
            return 0;
        }
        for (id, _) in &expired {
            tracing::info!(transfer = %id, "bncr file transfer expired");
        }
        let n = expired.len();
        let _ = blocking(move || {
            for (_, spool) in expired {
                let _ = std::fs::remove_file(spool);
            }
            Ok(())
        })
        .await;
        n
    }

    /// Handle `bncr.file.abort`.
    pub(crate) async fn file_abort(&self, p: FileEnd) -> Result<Value, RpcError> {
        let id = safe_id(&params::required(p.transfer_id, "transferId")?)?;
        let t = self.state().transfers.remove(&id);
        if let Some(t) = t {
            let spool = t.spool;
            let _ = blocking(move || {
                let _ = std::fs::remove_file(spool);
                Ok(())
            })
            .await;
            tracing::info!(transfer = %id, reason = p.reason.as_deref().unwrap_or(""), "bncr file transfer aborted");
        }
        Ok(json!({"ok": true, "transferId": id, "status": "aborted"}))
    }

    /// Handle `bncr.file.ack` for a server-pushed file event.
    pub(crate) fn file_ack(&self, p: FileAck) -> Result<Value, RpcError> {
        let id = params::required(p.transfer_id, "transferId")?;
        let stage = params::required(p.stage, "stage")?;
        if !["init", "chunk", "complete", "abort"].contains(&stage.as_str()) {
            return Err(RpcError::invalid_request(
                "stage must be init|chunk|complete|abort",
            ));
        }
        if stage == "chunk" && p.chunk_index.is_none() {
            return Err(RpcError::invalid_request("chunkIndex required"));
        }
        let key = (id.clone(), stage.clone(), p.chunk_index.unwrap_or(0));
        let waiter = self.state().waiters.0.remove(&key);
        let Some(tx) = waiter else {
            return Ok(json!({"ok": true, "transferId": id, "message": "no-waiter"}));
        };
        let error = p.error_message.or(p.error_code);
        let _ = tx.send(AckResult {
            ok: p.ok.unwrap_or(true),
            error,
            path: p.path,
        });
        Ok(json!({"ok": true, "transferId": id, "stage": stage}))
    }

    /// Whether `path` is a file this bridge may send to a client: only files
    /// under `<state_dir>/bncr/files/`.
    pub(crate) fn sendable_file(&self, path: &str) -> Option<PathBuf> {
        let root = std::fs::canonicalize(self.files_dir()).ok()?;
        let p = std::fs::canonicalize(path).ok()?;
        (p.starts_with(&root) && p.is_file()).then_some(p)
    }

    async fn emit_and_wait(
        &self,
        conn: ConnId,
        event: &str,
        key: WaiterKey,
        payload: Value,
    ) -> Result<AckResult, String> {
        let (tx, rx) = oneshot::channel();
        self.state().waiters.0.insert(key.clone(), tx);
        let sent = self
            .events
            .send(&[conn], event, &payload)
            .map_err(|e| e.to_string())?;
        if sent == 0 {
            self.state().waiters.0.remove(&key);
            return Err("connection gone".into());
        }
        let timeout = Duration::from_millis(self.cfg.file_ack_timeout_ms);
        let res = tokio::time::timeout(timeout, rx).await;
        self.state().waiters.0.remove(&key);
        match res {
            Ok(Ok(a)) if a.ok => Ok(a),
            Ok(Ok(a)) => Err(a.error.unwrap_or_else(|| format!("{} refused", key.1))),
            Ok(Err(_)) | Err(_) => Err(format!("timeout waiting for bncr.file.ack ({})", key.1)),
        }
    }

    /// Send a local file to `conn` in 256 KiB chunks, each acknowledged.
    /// Returns the client's path for the file (or its transfer id).
    pub(crate) async fn send_file(
        &self,
        conn: ConnId,
        account: &str,
        path: PathBuf,
        mime_type: Option<&str>,
    ) -> Result<String, String> {
        let id = self.new_id("xfer");
        let p2 = path.clone();
        let (sha, size) = tokio::task::spawn_blocking(move || hash_file(&p2))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if size > self.cfg.max_file_bytes {
            return Err(format!("file too large: {size} bytes"));
        }
        let total = size.div_ceil(OUT_CHUNK).max(1);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let result = async {
            self.emit_and_wait(conn, "plugin.bncr.file.init", (id.clone(), "init".into(), 0), json!({
                "transferId": id, "accountId": account, "fileName": name, "mimeType": mime_type,
                "fileSize": size, "chunkSize": OUT_CHUNK, "totalChunks": total, "fileSha256": sha,
            })).await?;
            for index in 0..total {
                let offset = index * OUT_CHUNK;
                let p3 = path.clone();
                let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                    let mut f = std::fs::File::open(&p3)?;
                    f.seek(SeekFrom::Start(offset))?;
                    let mut buf = Vec::with_capacity(OUT_CHUNK as usize);
                    f.take(OUT_CHUNK).read_to_end(&mut buf)?;
                    Ok(buf)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                self.emit_and_wait(conn, "plugin.bncr.file.chunk", (id.clone(), "chunk".into(), index), json!({
                    "transferId": id, "chunkIndex": index, "offset": offset, "size": bytes.len(),
                    "chunkSha256": sha_hex(&bytes),
                    "base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
                })).await?;
            }
            let done = self.emit_and_wait(conn, "plugin.bncr.file.complete", (id.clone(), "complete".into(), 0), json!({
                "transferId": id, "fileSha256": sha, "fileSize": size, "totalChunks": total,
            })).await?;
            Ok::<_, String>(done.path.unwrap_or_else(|| id.clone()))
        }
        .await;
        if let Err(e) = &result {
            let _ = self.events.send(
                &[conn],
                "plugin.bncr.file.abort",
                &json!({"transferId": id, "reason": e}),
            );
            tracing::warn!(transfer = %id, error = %e, "bncr file to client failed");
        }
        result
    }
}
