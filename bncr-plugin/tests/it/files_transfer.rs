//! Files both ways: client-to-gateway spooling with sha256 checks, and
//! gateway-to-client chunks each waiting for `bncr.file.ack`.

use crate::common::Host;
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}
fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_file_end_to_end_and_corrupted_chunk_rejected() {
    let host = Host::new(json!({"fileMinChunkBytes": 4096}));
    let g = host.start(1).await;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let chunk = 4096usize;
    let init = json!({"transferId": "t-1", "fileName": "../pic.png", "mimeType": "image/png", "fileSize": data.len(),
        "chunkSize": chunk, "totalChunks": 3, "fileSha256": sha(&data), "platform": "qq", "userId": "1"});
    let r = g.ok(1, "bncr.file.init", init.clone()).await;
    assert_eq!(
        (r["ok"].as_bool(), r["status"].as_str()),
        (Some(true), Some("init"))
    );
    assert_eq!(g.ok(1, "bncr.file.init", init).await["duplicated"], true);

    let bad = g
        .call(
            1,
            "bncr.file.chunk",
            json!({"transferId": "t-1", "chunkIndex": 0, "offset": 0, "size": chunk,
            "chunkSha256": sha(b"something else"), "base64": b64(&data[..chunk])}),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.message, "chunk sha256 mismatch");
    let early = g
        .call(1, "bncr.file.complete", json!({"transferId": "t-1"}))
        .await
        .unwrap_err();
    assert!(early.message.contains("missing 3 chunks"), "{early}");
    let d = early.details.unwrap();
    assert_eq!(
        (d["missingCount"].as_u64(), d["missing"].clone()),
        (Some(3), json!([0, 1, 2]))
    );

    for (i, part) in data.chunks(chunk).enumerate() {
        let r = g
            .ok(1, "bncr.file.chunk", json!({"transferId": "t-1", "chunkIndex": i, "offset": i * chunk, "size": part.len(),
                "chunkSha256": sha(part), "base64": b64(part)}))
            .await;
        assert_eq!(
            (r["received"].as_u64(), r["totalChunks"].as_u64()),
            (Some(i as u64 + 1), Some(3))
        );
    }
    let done = g
        .ok(1, "bncr.file.complete", json!({"transferId": "t-1"}))
        .await;
    assert_eq!(done["fileSha256"], sha(&data));
    assert_eq!(done["size"], data.len());
    assert_eq!(done["fileName"], "pic.png");
    let path = std::path::PathBuf::from(done["path"].as_str().unwrap());
    assert!(path.starts_with(host.dir.path().join("bncr/files")));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(
        g.call(1, "bncr.file.complete", json!({"transferId": "t-1"}))
            .await
            .is_err(),
        "transfer is gone"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_file_mismatch_and_abort() {
    let host = Host::new(json!({}));
    let g = host.start(1).await;
    g.ok(
        1,
        "bncr.file.init",
        json!({"transferId": "t-2", "fileSize": 3, "chunkSize": 3, "fileSha256": sha(b"xyz")}),
    )
    .await;
    g.ok(
        1,
        "bncr.file.chunk",
        json!({"transferId": "t-2", "chunkIndex": 0, "offset": 0, "base64": b64(b"abc")}),
    )
    .await;
    let e = g
        .call(1, "bncr.file.complete", json!({"transferId": "t-2"}))
        .await
        .unwrap_err();
    assert_eq!(e.message, "file sha256 mismatch");
    g.ok(
        1,
        "bncr.file.init",
        json!({"transferId": "t-3", "fileSize": 3}),
    )
    .await;
    let r = g
        .ok(
            1,
            "bncr.file.abort",
            json!({"transferId": "t-3", "reason": "user"}),
        )
        .await;
    assert_eq!(r["status"], "aborted");
    let e = g
        .call(
            1,
            "bncr.file.chunk",
            json!({"transferId": "t-3", "chunkIndex": 0, "offset": 0, "base64": b64(b"abc")}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.message, "transfer not found");
    let spool = host.dir.path().join("bncr/files/spool");
    assert_eq!(
        std::fs::read_dir(spool).unwrap().count(),
        0,
        "spools removed"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_file_goes_out_in_acked_chunks_before_the_push() {
    let host = Host::new(json!({"fileAckTimeoutMs": 5000}));
    host.transport.connect(1);
    let g = host.start(1).await;
    g.ok(1, "bncr.connect", json!({})).await;
    let dir = host.dir.path().join("bncr/files/out");
    std::fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..(300 * 1024u32)).map(|i| (i % 253) as u8).collect();
    let file = dir.join("report.bin");
    std::fs::write(&file, &data).unwrap();
    let id = g
        .send(
            "Bncr:qq:0:1",
            json!({"type": "file", "path": file, "fileName": "report.bin"}),
            "f-1",
        )
        .await
        .unwrap();
    let t = host.transport.clone();
    t.wait_for("file.init", Duration::from_secs(5), |t| {
        !t.named("plugin.bncr.file.init").is_empty()
    })
    .await;
    let init = t.named("plugin.bncr.file.init").remove(0).payload;
    assert_eq!(
        (init["totalChunks"].as_u64(), init["fileSize"].as_u64()),
        (Some(2), Some(data.len() as u64))
    );
    assert_eq!(init["fileSha256"], sha(&data));
    let xfer = init["transferId"].as_str().unwrap().to_string();
    assert!(t.pushes(1).is_empty(), "no push before the file is through");
    g.ok(
        1,
        "bncr.file.ack",
        json!({"transferId": xfer, "stage": "init", "ok": true}),
    )
    .await;
    let mut got = Vec::new();
    for i in 0..2u64 {
        t.wait_for("chunk", Duration::from_secs(5), |t| {
            t.named("plugin.bncr.file.chunk").len() as u64 > i
        })
        .await;
        let c = t.named("plugin.bncr.file.chunk").remove(i as usize).payload;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(c["base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(c["chunkSha256"], sha(&bytes));
        assert!(bytes.len() <= 256 * 1024);
        got.extend(bytes);
        g.ok(
            1,
            "bncr.file.ack",
            json!({"transferId": xfer, "stage": "chunk", "chunkIndex": i}),
        )
        .await;
    }
    assert_eq!(got, data);
    t.wait_for("complete", Duration::from_secs(5), |t| {
        !t.named("plugin.bncr.file.complete").is_empty()
    })
    .await;
    g.ok(
        1,
        "bncr.file.ack",
        json!({"transferId": xfer, "stage": "complete", "path": "/client/report.bin"}),
    )
    .await;
    t.wait_for("push", Duration::from_secs(5), |t| {
        t.pushes(1) == vec![id.clone()]
    })
    .await;
    let push = t.named("plugin.bncr.push").remove(0).payload;
    assert_eq!(push["message"]["path"], "/client/report.bin");
    g.ok(1, "bncr.ack", json!({"messageId": id})).await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_file_ack_aborts_and_the_message_is_retried() {
    let host = Host::new(json!({"retryBaseMs": 10, "retryCapMs": 10}));
    host.transport.connect(1);
    let g = host.start(1).await;
    g.ok(1, "bncr.connect", json!({})).await;
    let dir = host.dir.path().join("bncr/files/out");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a.txt");
    std::fs::write(&file, b"hello").unwrap();
    g.send("Bncr:qq:0:1", json!({"type": "file", "path": file}), "f-2")
        .await
        .unwrap();
    let t = host.transport.clone();
    t.wait_for("file.init", Duration::from_secs(5), |t| {
        !t.named("plugin.bncr.file.init").is_empty()
    })
    .await;
    let xfer = t.named("plugin.bncr.file.init")[0].payload["transferId"]
        .as_str()
        .unwrap()
        .to_string();
    g.ok(
        1,
        "bncr.file.ack",
        json!({"transferId": xfer, "stage": "init", "ok": false, "errorCode": "disk-full"}),
    )
    .await;
    t.wait_for("abort", Duration::from_secs(5), |t| {
        !t.named("plugin.bncr.file.abort").is_empty()
    })
    .await;
    t.wait_for("second init", Duration::from_secs(5), |t| {
        t.named("plugin.bncr.file.init").len() >= 2
    })
    .await;
    assert!(t.pushes(1).is_empty());
    g.stop().await;
}
