//! Bounds on what a peer can make the process hold, and the counters that
//! say when one tripped ([`LimitMetrics`], in `metrics`).
//!
//! - `gate`: [`Gate`], caps on open connections in total, before auth and
//!   per peer address. A [`Permit`] lives as long as its connection; at the
//!   pending caps an unauthenticated connection is evicted, so half-sent
//!   requests cannot lock a real client out: at a peer's own cap that
//!   peer's oldest, at a global cap the oldest of the peer (an IPv6 peer
//!   counted by its /64) holding the most pending connections, so that a
//!   few addresses churning connections evict only their own.
//! - `rlimit`: the file-descriptor limit and the connection cap it implies.
//! - `idle_io`: [`Activity`] and [`idle`], the HTTP stage's idle timeout.
//! - `write_meter`: [`WriteMeter`] sees how many bytes the WebSocket layer
//!   holds unwritten (pongs and close frames included) so they count toward
//!   the connection's `maxBufferedBytes` with its outbox.
//! - `origin`: the Origin check on WebSocket upgrades.
//! - `close_codes`: the close code for each protocol violation.

mod close_codes;
mod gate;
mod idle_io;
mod metrics;
mod origin;
mod rlimit;
mod write_meter;

pub(crate) use close_codes::{binary_frame_close, read_error_close};
pub(crate) use gate::{Caps, Gate, Permit, REFUSED_RESPONSE};
pub(crate) use idle_io::{Activity, idle};
pub(crate) use metrics::LimitMetrics;
pub(crate) use origin::{normalize_origin, origin_allowed};
pub(crate) use rlimit::{fd_bounded_cap, is_fd_exhaustion};
pub(crate) use write_meter::{WriteBacklog, WriteMeter};
