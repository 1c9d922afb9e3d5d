//! The door of a generation and its per-plugin in-flight counts: a request
//! is admitted while the door is open and counted in the plugin that serves
//! it (and in a plugin it also uses), so each plugin's hand-over waits for
//! exactly its own requests.

use super::RestartScope;
use crate::registry::PluginIndex;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Requests in flight in one plugin of a generation.
#[derive(Default)]
pub(super) struct PluginCount {
    inflight: AtomicUsize,
    empty: Notify,
}

/// Counts requests admitted by one generation, per plugin, and closes the
/// door on them.
pub(super) struct Admission {
    pub(super) open: AtomicBool,
    pub(super) plugins: Box<[PluginCount]>,
}

impl Admission {
    fn enter(&self, plugin: PluginIndex) -> bool {
        self.plugins[plugin].inflight.fetch_add(1, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) {
            return true;
        }
        self.leave(plugin);
        false
    }

    fn leave(&self, plugin: PluginIndex) {
        let count = &self.plugins[plugin];
        if count.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && !self.open.load(Ordering::SeqCst) {
            count.empty.notify_waiters();
        }
    }

    pub(super) fn in_flight(&self, plugin: PluginIndex) -> usize {
        self.plugins[plugin].inflight.load(Ordering::SeqCst)
    }

    pub(super) async fn wait_empty(&self, plugin: PluginIndex) {
        let count = &self.plugins[plugin];
        loop {
            let notified = count.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if count.inflight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// A request admitted by a generation. While it lives the generation counts
/// it as in flight in the plugin that serves it; dropping it releases the
/// generation.
pub struct Admitted {
    scope: Option<Arc<RestartScope>>,
    admission: Arc<Admission>,
    plugin: PluginIndex,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("generation", &self.scope().generation)
            .field("plugin", &self.plugin)
            .finish()
    }
}

impl Admitted {
    /// The generation that admitted the request.
    pub fn scope(&self) -> &Arc<RestartScope> {
        self.scope.as_ref().expect("present until drop")
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // Release the scope before counting the request out, so that once the
        // drain sees zero in flight no request holds the scope any more.
        drop(self.scope.take());
        self.admission.leave(self.plugin);
    }
}

/// A request of one plugin that also uses another plugin of its generation
/// (the core `send` calling a channel): counted in that plugin too, so that
/// plugin's hand-over waits for it, and cancelled with that plugin's own
/// requests at its drain deadline.
pub(crate) struct PluginUse {
    admission: Arc<Admission>,
    plugin: PluginIndex,
    cancel: CancellationToken,
}

impl PluginUse {
    /// Resolves when the used plugin cancels its in-flight requests (its
    /// drain deadline, or its generation dropped): answer
    /// [`RestartScope::answer_cancelled`] then, as that plugin's requests are.
    pub(crate) async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

impl Drop for PluginUse {
    fn drop(&mut self) {
        self.admission.leave(self.plugin);
    }
}

impl RestartScope {
    /// Requests in flight in this generation.
    pub fn in_flight(&self) -> usize {
        (0..self.plugins.len())
            .map(|p| self.admission.in_flight(p))
            .sum()
    }

    /// Requests in flight in plugin `id` of this generation.
    pub fn plugin_in_flight(&self, id: &str) -> usize {
        self.plugin_index(id)
            .map_or(0, |p| self.admission.in_flight(p))
    }

    /// Whether it still admits requests.
    pub fn is_admitting(&self) -> bool {
        self.admission.open.load(Ordering::SeqCst)
    }

    /// Admit a request counted in the core plugin, or `None` if this
    /// generation has closed its door.
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        self.try_admit_for(0)
    }

    /// Admit a request served by plugin `plugin` (its in-flight count is the
    /// one that plugin's hand-over drains), or `None` if this generation has
    /// closed its door.
    pub(crate) fn try_admit_for(self: &Arc<Self>, plugin: PluginIndex) -> Option<Admitted> {
        self.admission.enter(plugin).then(|| Admitted {
            scope: Some(self.clone()),
            admission: self.admission.clone(),
            plugin,
        })
    }

    /// Count an admitted request in `plugin` too, or `None` once the door
    /// is closed (the plugin may be handing over).
    pub(crate) fn use_plugin(&self, plugin: PluginIndex) -> Option<PluginUse> {
        self.admission.enter(plugin).then(|| PluginUse {
            admission: self.admission.clone(),
            plugin,
            cancel: self.plugins[plugin].cancel.clone(),
        })
    }

    /// Admit nothing new from now on.
    pub(crate) fn close_admission(&self) {
        self.admission.open.store(false, Ordering::SeqCst);
    }
}
