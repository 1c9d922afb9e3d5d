//! Close codes for protocol violations: 1003 for a binary frame, 1007 for
//! invalid UTF-8, 1002 for a framing violation, 1009 for an oversized
//! frame, each counted.

use super::LimitMetrics;
use tokio_tungstenite::tungstenite;

/// The close for a binary data frame (the protocol is text only).
pub(crate) fn binary_frame_close(m: &LimitMetrics) -> (u16, &'static str) {
    m.count(&m.close_1003);
    (1003, "text frames only")
}

/// The close a read error calls for: 1007 for invalid UTF-8, 1002 for a
/// framing violation, 1009 for an oversized frame; `None` when the
/// connection is simply gone.
pub(crate) fn read_error_close(
    m: &LimitMetrics,
    e: &tungstenite::Error,
) -> Option<(u16, &'static str)> {
    use tungstenite::error::ProtocolError;
    let (code, reason, counter) = match e {
        tungstenite::Error::Utf8(_) => (1007, "invalid utf-8", &m.close_1007),
        tungstenite::Error::Capacity(_) => (1009, "payload too large", &m.close_1009),
        tungstenite::Error::Protocol(
            ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing,
        ) => return None,
        tungstenite::Error::Protocol(_) => (1002, "protocol error", &m.close_1002),
        _ => return None,
    };
    m.count(counter);
    Some((code, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn read_errors_map_to_close_codes() {
        let m = LimitMetrics::default();
        let utf8 = tungstenite::Error::Utf8("bad".into());
        assert_eq!(read_error_close(&m, &utf8).unwrap().0, 1007);
        let framing =
            tungstenite::Error::Protocol(tungstenite::error::ProtocolError::NonZeroReservedBits);
        assert_eq!(read_error_close(&m, &framing).unwrap().0, 1002);
        assert_eq!(
            read_error_close(&m, &tungstenite::Error::ConnectionClosed),
            None
        );
        assert_eq!(binary_frame_close(&m).0, 1003);
        assert_eq!(m.close_1003.load(Ordering::Relaxed), 1);
    }
}
