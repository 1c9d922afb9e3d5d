//! Every bound a Bncr client controls, at N-1, N, N+1 and 5N: accounts,
//! offline leases, file transfers in progress and their expiry, chunking,
//! and the size of the missing-chunks answer.

use crate::common::{
    WAIT, bncr_client, diag, ok, operator, payloads, start, state_dir, until_counter, wait_for,
};
use plugin_api::ErrorCode;
use serde_json::{Value, json};

fn account_ids(d: &Value) -> Vec<String> {
    d["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["accountId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_capped_unless_configured() {
    const N: usize = 3;
    let dir = state_dir();
    let host = start(dir.path(), json!({"maxAccounts": N})).await;
    let c = bncr_client(&host);
    // N-1, N: accepted.
    for i in 0..N {
        let r = ok(&c, "bncr.connect", json!({"accountId": format!("acc-{i}")})).await;
        assert_eq!(r["accountId"], format!("acc-{i}"));
    }
    // N+1 .. 5N: refused, and nothing is kept for them.
    for i in N..5 * N {
        let e = c
            .call(
                "bncr.inbound",
                json!({"accountId": format!("acc-{i}"), "platform": "qq", "userId": "1"}),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert_eq!(e.details_code(), Some("account-limit"), "{e}");
    }
    let d = diag(&c).await;
    assert_eq!(account_ids(&d), ["acc-0", "acc-1", "acc-2"]);
    assert_eq!(d["counters"]["accountsRefused"], 4 * N as u64);
    // Known accounts keep working at the cap.
    ok(&c, "bncr.activity", json!({"accountId": "acc-1"})).await;
    host.shutdown().await;
    // With `accounts` configured, the list is the bound.
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"maxAccounts": 1, "accounts": ["a", "b"]}),
    )
    .await;
    let c = bncr_client(&host);
    ok(&c, "bncr.connect", json!({"accountId": "a"})).await;
    ok(&c, "bncr.connect", json!({"accountId": "b"})).await;
    let e = c
        .call("bncr.connect", json!({"accountId": "c"}))
        .await
        .unwrap_err();
    assert!(e.message.starts_with("unknown accountId"), "{e}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_leases_are_pruned_and_free_their_account() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"maxAccounts": 2, "leaseTtlMs": 40})).await;
    let (gone, stays) = (bncr_client(&host), bncr_client(&host));
    ok(&gone, "bncr.connect", json!({"accountId": "gone"})).await;
    ok(&stays, "bncr.connect", json!({"accountId": "stays"})).await;
    let e = stays
        .call("bncr.connect", json!({"accountId": "third"}))
        .await
        .unwrap_err();
    assert_eq!(e.details_code(), Some("account-limit"));
    gone.disconnect();
    until_counter(&stays, "leasesPruned", 1).await;
    // The online lease is never pruned, however old.
    let d = diag(&stays).await;
    assert_eq!(account_ids(&d), ["stays"], "{d}");
    ok(&stays, "bncr.connect", json!({"accountId": "third"})).await;
    // Pruned in the store too: a new generation restores no such lease.
    host.restart().await.unwrap();
    let d = diag(&stays).await;
    assert!(!account_ids(&d).contains(&"gone".to_string()), "{d}");
    host.shutdown().await;
}

fn init(id: &str, account: &str) -> Value {
    json!({"transferId": id, "accountId": account, "fileSize": 4, "chunkSize": 4})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_in_progress_are_capped_per_account_and_in_total() {
    const PER: usize = 2;
    const TOTAL: usize = 4;
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"maxTransfersPerAccount": PER, "maxTransfers": TOTAL}),
    )
    .await;
    let c = bncr_client(&host);
    // Per account: N-1 and N accepted, N+1 .. 5N refused.
    for i in 0..5 * PER {
        let r = c.call("bncr.file.init", init(&format!("a-{i}"), "A")).await;
        if i < PER {
            assert_eq!(r.unwrap()["ok"], true);
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert_eq!(e.retryable, Some(true));
            let d = e.details.unwrap();
            assert_eq!(
                (d["code"].as_str(), d["scope"].as_str()),
                (Some("transfer-limit"), Some("account"))
            );
        }
    }
    // Another account fills the total: N-1, N; then a third account is
    // refused by the total bound.
    for i in 0..PER {
        ok(&c, "bncr.file.init", init(&format!("b-{i}"), "B")).await;
    }
    for i in 0..5 * TOTAL - TOTAL {
        let e = c
            .call("bncr.file.init", init(&format!("c-{i}"), "C"))
            .await
            .unwrap_err();
        assert_eq!(e.details.unwrap()["scope"], "total");
    }
    let d = diag(&c).await;
    assert_eq!(d["transfers"], TOTAL);
    assert_eq!(
        d["counters"]["transfersRefused"],
        (5 * PER - PER + 5 * TOTAL - TOTAL) as u64
    );
    // A repeated init of a transfer in progress is not a new one.
    assert_eq!(
        ok(&c, "bncr.file.init", init("a-0", "A")).await["duplicated"],
        true
    );
    // Finishing or aborting one frees its place.
    ok(&c, "bncr.file.abort", json!({"transferId": "a-0"})).await;
    ok(&c, "bncr.file.init", init("c-0", "C")).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transfers_expire_with_their_spooled_bytes() {
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"transferTtlMs": 40, "fileMinChunkBytes": 1}),
    )
    .await;
    let c = bncr_client(&host);
    ok(
        &c,
        "bncr.file.init",
        json!({"transferId": "idle", "fileSize": 2, "chunkSize": 1}),
    )
    .await;
    ok(
        &c,
        "bncr.file.chunk",
        json!({"transferId": "idle", "chunkIndex": 0, "offset": 0, "base64": "QQ=="}),
    )
    .await;
    let spool = dir.path().join("bncr/files/spool/idle.part");
    assert!(spool.exists());
    until_counter(&c, "transfersExpired", 1).await;
    // The bridge counts the expiry, then removes the bytes off the async
    // workers.
    let deadline = tokio::time::Instant::now() + WAIT;
    while spool.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(!spool.exists(), "spooled bytes removed");
    let e = c
        .call(
            "bncr.file.chunk",
            json!({"transferId": "idle", "chunkIndex": 1, "offset": 1, "base64": "QQ=="}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.message, "transfer not found");
    assert_eq!(diag(&c).await["transfers"], 0);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_making_progress_does_not_expire() {
    let dir = state_dir();
    let host = start(dir.path(), json!({"transferTtlMs": 60000})).await;
    let c = bncr_client(&host);
    ok(&c, "bncr.file.init", init("busy", "A")).await;
    // Another init sweeps expired transfers first; this one is not.
    ok(&c, "bncr.file.init", init("other", "A")).await;
    let d = diag(&c).await;
    assert_eq!(
        (
            d["transfers"].as_u64(),
            d["counters"]["transfersExpired"].as_u64()
        ),
        (Some(2), Some(0))
    );
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunking_is_bounded_below_in_size_and_above_in_count() {
    const MIN: u64 = 8;
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"fileMinChunkBytes": MIN, "maxTransfersPerAccount": 100, "maxTransfers": 100}),
    )
    .await;
    let c = bncr_client(&host);
    let try_init = |id: String, size: u64, chunk: u64| {
        let c = &c;
        async move {
            c.call(
                "bncr.file.init",
                json!({"transferId": id, "fileSize": size, "chunkSize": chunk}),
            )
            .await
        }
    };
    let e = try_init("m-1".into(), 64, MIN - 1).await.unwrap_err();
    assert_eq!(e.details_code(), Some("chunk-too-small"), "{e}");
    for (i, chunk) in [MIN, MIN + 1, 5 * MIN].into_iter().enumerate() {
        try_init(format!("m{i}"), 64, chunk).await.unwrap();
    }
    // A file smaller than the minimum may come whole.
    try_init("small".into(), MIN - 1, MIN - 1).await.unwrap();
    host.shutdown().await;

    const MAX: u64 = 8;
    let dir = state_dir();
    let host = start(dir.path(), json!({"fileMinChunkBytes": 1, "fileMaxChunks": MAX, "maxTransfersPerAccount": 100, "maxTransfers": 100}),).await;
    let c = bncr_client(&host);
    for chunks in [MAX - 1, MAX, MAX + 1, 5 * MAX] {
        let r = c
            .call(
                "bncr.file.init",
                json!({"transferId": format!("n{chunks}"), "fileSize": chunks, "chunkSize": 1}),
            )
            .await;
        if chunks <= MAX {
            assert_eq!(r.unwrap()["totalChunks"], chunks);
        } else {
            assert_eq!(r.unwrap_err().details_code(), Some("too-many-chunks"));
        }
    }
    let d = diag(&c).await;
    assert_eq!(d["counters"]["chunkingRefused"], 2);
    host.shutdown().await;

    // The reported attack with the defaults: refused at init, nothing kept.
    let dir = state_dir();
    let host = start(dir.path(), json!({})).await;
    let c = bncr_client(&host);
    let e = c
        .call(
            "bncr.file.init",
            json!({"transferId": "amp", "fileSize": 52428800u64, "chunkSize": 1}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.details_code(), Some("chunk-too-small"));
    assert_eq!(diag(&c).await["transfers"], 0);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_missing_chunks_answer_is_bounded() {
    const LISTED: u64 = 16;
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"fileMinChunkBytes": 1, "maxTransfersPerAccount": 100, "maxTransfers": 100}),
    )
    .await;
    let c = bncr_client(&host);
    for missing in [LISTED - 1, LISTED, LISTED + 1, 5 * LISTED] {
        let id = format!("t{missing}");
        // One chunk more than missing, and chunk 0 received.
        ok(
            &c,
            "bncr.file.init",
            json!({"transferId": id, "fileSize": missing + 1, "chunkSize": 1}),
        )
        .await;
        ok(
            &c,
            "bncr.file.chunk",
            json!({"transferId": id, "chunkIndex": 0, "offset": 0, "base64": "QQ=="}),
        )
        .await;
        let e = c
            .call("bncr.file.complete", json!({"transferId": id}))
            .await
            .unwrap_err();
        let d = e.details.clone().unwrap();
        assert_eq!(d["missingCount"], missing, "{e}");
        let listed: Vec<u64> = (1..=missing.min(LISTED)).collect();
        assert_eq!(d["missing"], json!(listed), "{e}");
        assert!(e.message.len() < 200, "{e}");
    }
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_inbound_is_capped_until_an_operator_drains_it() {
    const N: usize = 3;
    let inbound = |id: &str| json!({"platform": "qq", "groupId": "0", "userId": "42", "msg": "hi", "msgId": id});
    let dir = state_dir();
    let host = start(
        dir.path(),
        json!({"maxInboundPending": N, "inboundGraceMs": 0, "inboundRetryMs": 20}),
    )
    .await;
    let c = bncr_client(&host);
    ok(&c, "bncr.connect", json!({})).await;
    // N-1, N: accepted (nobody but the Bncr client is connected).
    for i in 0..N {
        let r = ok(&c, "bncr.inbound", inbound(&format!("m{i}"))).await;
        assert_eq!(r["accepted"], true, "{r}");
        assert_eq!(diag(&c).await["inboundPending"], i as u64 + 1);
    }
    // N+1 .. 5N: refused, and nothing is kept for them.
    for i in N..5 * N {
        let r = ok(&c, "bncr.inbound", inbound(&format!("m{i}"))).await;
        assert_eq!(r["accepted"], false, "{r}");
        assert_eq!(r["reason"], "inbound-full", "{r}");
    }
    // A retry of a pending message is still a duplicate, not a refusal.
    let r = ok(&c, "bncr.inbound", inbound("m0")).await;
    assert_eq!(r["accepted"], true, "{r}");
    assert_eq!(r["duplicated"], true, "{r}");
    let d = diag(&c).await;
    assert_eq!(d["inboundPending"], N as u64, "{d}");
    assert_eq!(d["counters"]["inboundRefused"], 4 * N as u64, "{d}");
    // Nothing refused was journaled: a later generation loads exactly N.
    host.restart().await.unwrap();
    assert_eq!(diag(&c).await["inboundPending"], N as u64);
    let r = ok(&c, "bncr.inbound", inbound("late")).await;
    assert_eq!(r["reason"], "inbound-full", "{r}");
    // An operator drains the queue: room again.
    let op = operator(&host);
    wait_for(&host, "drain", || payloads(&op, "chat.inbound").len() == N).await;
    until_counter(&c, "inboundHandedOn", N as u64).await;
    assert_eq!(diag(&c).await["inboundPending"], 0);
    let r = ok(&c, "bncr.inbound", inbound("after-drain")).await;
    assert_eq!(r["accepted"], true, "{r}");
    assert!(r.get("duplicated").is_none(), "{r}");
    host.shutdown().await;
}
