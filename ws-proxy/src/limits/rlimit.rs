//! The file-descriptor bound: the soft limit raised to the hard one, a
//! connection cap that keeps client sockets below it, and accept errors
//! that mean descriptors ran out.

use super::gate::EVICTION_SLACK;
use std::io;

/// File descriptors kept free for everything that is not a client socket
/// (listener, store files, plugin files, logs).
const FD_RESERVE: u64 = 128;

/// Whether an accept error means the process (or system) ran out of file
/// descriptors.
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE (per process) and ENFILE (system-wide) on Linux.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// Raise the soft file-descriptor limit to the hard one and return the
/// connection cap that keeps client sockets below it.
pub(crate) fn fd_bounded_cap(configured: usize) -> (usize, Option<u64>) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (configured, None);
    };
    let soft = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let room = if soft > 2 * FD_RESERVE {
        soft - FD_RESERVE
    } else {
        soft / 2
    };
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    (
        configured.min(room.saturating_sub(EVICTION_SLACK)).max(1),
        Some(soft),
    )
}
