//! Files both ways: client-to-gateway spooling with sha256 checks, and
//! gateway-to-client chunks each waiting for `bncr.file.ack`.

use crate::common::{
    bncr_client, delivered, ok, operator, pushes, send, start, state_dir, wait_for,
};
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}
fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_file_end_to_end_and_corrupted_chunk_rejected() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"fileMinChunkBytes": 4096})).await;
    let c = bncr_client(&host);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let chunk = 4096usize;
    let init = json!({"transferId": "t-1", "fileName": "../pic.png", "mimeType": "image/png", "fileSize": data.len(),
        "chunkSize": chunk, "totalChunks": 3, "fileSha256": sha(&data), "platform": "qq", "userId": "1"});
    let r = ok(&c, "bncr.file.init", init.clone()).await;
    assert_eq!(
        (r["ok"].as_bool(), r["status"].as_str()),
        (Some(true), Some("init"))
    );
    assert_eq!(ok(&c, "bncr.file.init", init).await["duplicated"], true);

    let bad = c
        .call(
            "bncr.file.chunk",
            json!({"transferId": "t-1", "chunkIndex": 0, "offset": 0, "size": chunk,
            "chunkSha256": sha(b"something else"), "base64": b64(&data[..chunk])}),
        )
        .await
        .unwrap_err();
    assert_eq!(bad.message, "chunk sha256 mismatch");
    let early = c
        .call("bncr.file.complete", json!({"transferId": "t-1"}))
        .await
        .unwrap_err();
    assert!(early.message.contains("missing 3 chunks"), "{early}");
    let d = early.details.unwrap();
    assert_eq!(
        (d["missingCount"].as_u64(), d["missing"].clone()),
        (Some(3), json!([0, 1, 2]))
    );

    for (i, part) in data.chunks(chunk).enumerate() {
        let r = ok(
            &c,
            "bncr.file.chunk",
            json!({"transferId": "t-1", "chunkIndex": i, "offset": i * chunk, "size": part.len(),
                "chunkSha256": sha(part), "base64": b64(part)}),
        )
        .await;
        assert_eq!(
            (r["received"].as_u64(), r["totalChunks"].as_u64()),
            (Some(i as u64 + 1), Some(3))
        );
    }
    let done = ok(&c, "bncr.file.complete", json!({"transferId": "t-1"})).await;
    assert_eq!(done["fileSha256"], sha(&data));
    assert_eq!(done["size"], data.len());
    assert_eq!(done["fileName"], "pic.png");
    let path = std::path::PathBuf::from(done["path"].as_str().unwrap());
    assert!(path.starts_with(dir.path().join("bncr/files")));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert!(
        c.call("bncr.file.complete", json!({"transferId": "t-1"}))
            .await
            .is_err(),
        "transfer is gone"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_file_mismatch_and_abort() {
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let c = bncr_client(&host);
    ok(
        &c,
        "bncr.file.init",
        json!({"transferId": "t-2", "fileSize": 3, "chunkSize": 3, "fileSha256": sha(b"xyz")}),
    )
    .await;
    ok(
        &c,
        "bncr.file.chunk",
        json!({"transferId": "t-2", "chunkIndex": 0, "offset": 0, "base64": b64(b"abc")}),
    )
    .await;
    let e = c
        .call("bncr.file.complete", json!({"transferId": "t-2"}))
        .await
        .unwrap_err();
    assert_eq!(e.message, "file sha256 mismatch");
    ok(
        &c,
        "bncr.file.init",
        json!({"transferId": "t-3", "fileSize": 3}),
    )
    .await;
    let r = ok(
        &c,
        "bncr.file.abort",
        json!({"transferId": "t-3", "reason": "user"}),
    )
    .await;
    assert_eq!(r["status"], "aborted");
    let e = c
        .call(
            "bncr.file.chunk",
            json!({"transferId": "t-3", "chunkIndex": 0, "offset": 0, "base64": b64(b"abc")}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.message, "transfer not found");
    let spool = dir.path().join("bncr/files/spool");
    assert_eq!(
        std::fs::read_dir(spool).unwrap().count(),
        0,
        "spools removed"
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_file_goes_out_in_acked_chunks_before_the_push() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"fileAckTimeoutMs": 5000})).await;
    let c = bncr_client(&host);
    let op = operator(&host);
    ok(&c, "bncr.connect", json!({})).await;
    let out = dir.path().join("bncr/files/out");
    std::fs::create_dir_all(&out).unwrap();
    let data: Vec<u8> = (0..(300 * 1024u32)).map(|i| (i % 253) as u8).collect();
    let file = out.join("report.bin");
    std::fs::write(&file, &data).unwrap();
    let id = send(
        &op,
        "Bncr:qq:0:1",
        json!({"type": "file", "path": file, "fileName": "report.bin"}),
        "f-1",
    )
    .await
    .unwrap();
    let named = |name: &str| delivered(&host, name);
    wait_for(&host, "file.init", || {
        !named("plugin.bncr.file.init").is_empty()
    })
    .await;
    let init = named("plugin.bncr.file.init").remove(0);
    assert_eq!(
        (init["totalChunks"].as_u64(), init["fileSize"].as_u64()),
        (Some(2), Some(data.len() as u64))
    );
    assert_eq!(init["fileSha256"], sha(&data));
    let xfer = init["transferId"].as_str().unwrap().to_string();
    assert!(pushes(&c).is_empty(), "no push before the file is through");
    ok(
        &c,
        "bncr.file.ack",
        json!({"transferId": xfer, "stage": "init", "ok": true}),
    )
    .await;
    let mut got = Vec::new();
    for i in 0..2u64 {
        wait_for(&host, "chunk", || {
            named("plugin.bncr.file.chunk").len() as u64 > i
        })
        .await;
        let chunk = named("plugin.bncr.file.chunk").remove(i as usize);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(chunk["base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(chunk["chunkSha256"], sha(&bytes));
        assert!(bytes.len() <= 256 * 1024);
        got.extend(bytes);
        ok(
            &c,
            "bncr.file.ack",
            json!({"transferId": xfer, "stage": "chunk", "chunkIndex": i}),
        )
        .await;
    }
    assert_eq!(got, data);
    wait_for(&host, "complete", || {
        !named("plugin.bncr.file.complete").is_empty()
    })
    .await;
    ok(
        &c,
        "bncr.file.ack",
        json!({"transferId": xfer, "stage": "complete", "path": "/client/report.bin"}),
    )
    .await;
    wait_for(&host, "push", || pushes(&c) == vec![id.clone()]).await;
    let push = named("plugin.bncr.push").remove(0);
    assert_eq!(push["message"]["path"], "/client/report.bin");
    ok(&c, "bncr.ack", json!({"messageId": id})).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_file_ack_aborts_and_the_message_is_retried() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"retryBaseMs": 10, "retryCapMs": 10})).await;
    let c = bncr_client(&host);
    let op = operator(&host);
    ok(&c, "bncr.connect", json!({})).await;
    let out = dir.path().join("bncr/files/out");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("a.txt");
    std::fs::write(&file, b"hello").unwrap();
    send(
        &op,
        "Bncr:qq:0:1",
        json!({"type": "file", "path": file}),
        "f-2",
    )
    .await
    .unwrap();
    let named = |name: &str| delivered(&host, name);
    wait_for(&host, "file.init", || {
        !named("plugin.bncr.file.init").is_empty()
    })
    .await;
    let xfer = named("plugin.bncr.file.init")[0]["transferId"]
        .as_str()
        .unwrap()
        .to_string();
    ok(
        &c,
        "bncr.file.ack",
        json!({"transferId": xfer, "stage": "init", "ok": false, "errorCode": "disk-full"}),
    )
    .await;
    wait_for(&host, "abort", || {
        !named("plugin.bncr.file.abort").is_empty()
    })
    .await;
    wait_for(&host, "second init", || {
        named("plugin.bncr.file.init").len() >= 2
    })
    .await;
    assert!(pushes(&c).is_empty());
    host.shutdown().await;
}
