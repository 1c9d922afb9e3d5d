//! Scope-bound state and tasks.
//!
//! Everything a plugin keeps belongs to one generation (one `RestartScope` in
//! the host). [`ScopeLife`] is the plugin's view of that generation: it hands
//! out [`ScopeHandle`]s for state and spawns background tasks that belong to
//! the generation. The host keeps the matching [`LifeController`] and retires
//! the generation when it ends; from then on handles refuse work, event sinks
//! refuse to send and the generation's tasks are cancelled, then aborted.

use crate::RpcError;
use once_cell::sync::OnceCell;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::AbortHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// Work was refused because the generation it belongs to has retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// The retired generation.
    pub generation: u64,
}

impl fmt::Display for Retired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "generation {} has retired", self.generation)
    }
}

impl std::error::Error for Retired {}

impl From<Retired> for RpcError {
    fn from(_: Retired) -> Self {
        RpcError::restarting()
    }
}

struct LifeInner {
    generation: u64,
    retired: AtomicBool,
    cancel: CancellationToken,
    tracker: TaskTracker,
    aborts: Mutex<Vec<AbortHandle>>,
}

/// A plugin's view of the generation it was constructed in. Cheap to clone.
#[derive(Clone)]
pub struct ScopeLife {
    inner: Arc<LifeInner>,
}

impl fmt::Debug for ScopeLife {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeLife")
            .field("generation", &self.inner.generation)
            .field("retired", &self.is_retired())
            .finish()
    }
}

impl ScopeLife {
    /// A new, live generation and the controller that retires it
    /// ([`crate::host::scope_life`]).
    pub(crate) fn new(generation: u64) -> (ScopeLife, LifeController) {
        let inner = Arc::new(LifeInner {
            generation,
            retired: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            aborts: Mutex::new(Vec::new()),
        });
        (
            ScopeLife {
                inner: inner.clone(),
            },
            LifeController { inner },
        )
    }

    /// The generation number.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Whether the generation has retired.
    pub fn is_retired(&self) -> bool {
        self.inner.retired.load(Ordering::Acquire)
    }

    /// `Ok` while live, `Err(Retired)` once retired.
    pub fn check(&self) -> Result<(), Retired> {
        if self.is_retired() {
            Err(Retired {
                generation: self.inner.generation,
            })
        } else {
            Ok(())
        }
    }

    /// Resolves when the generation retires; background loops select on it.
    pub fn retired(&self) -> WaitForCancellationFuture<'_> {
        self.inner.cancel.cancelled()
    }

    /// A token cancelled when the generation retires, for tasks that need an
    /// owned one.
    pub fn cancellation(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Spawn a background task that belongs to this generation. It is told to
    /// stop (via [`ScopeLife::retired`]) when the generation retires and is
    /// aborted if still running when the host drops the generation. Refused
    /// once retired. Must be called within a tokio runtime.
    pub fn spawn<F>(&self, fut: F) -> Result<(), Retired>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.check()?;
        let cancel = self.inner.cancel.clone();
        let handle = self.inner.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {}
                () = fut => {}
            }
        });
        let mut aborts = lock(&self.inner.aborts);
        if aborts.len() >= 64 {
            aborts.retain(|h| !h.is_finished());
        }
        aborts.push(handle.abort_handle());
        Ok(())
    }

    /// A new handle for state of type `T`, created lazily, once, in this
    /// generation.
    pub fn handle<T>(&self) -> ScopeHandle<T> {
        ScopeHandle {
            life: self.clone(),
            cell: Arc::new(OnceCell::new()),
        }
    }
}

/// The host's side of a generation: retires it and reaps its tasks.
pub struct LifeController {
    inner: Arc<LifeInner>,
}

impl fmt::Debug for LifeController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LifeController")
            .field("generation", &self.inner.generation)
            .finish()
    }
}

impl LifeController {
    /// Retire the generation: handles and sinks refuse from now on and every
    /// task spawned through [`ScopeLife::spawn`] is told to stop. Idempotent.
    pub fn retire(&self) {
        self.inner.retired.store(true, Ordering::Release);
        self.inner.cancel.cancel();
        self.inner.tracker.close();
    }

    /// Whether [`LifeController::retire`] ran.
    pub fn is_retired(&self) -> bool {
        self.inner.retired.load(Ordering::Acquire)
    }

    /// How many of the generation's tasks are still running.
    pub fn running_tasks(&self) -> usize {
        self.inner.tracker.len()
    }

    /// Wait up to `grace` for the retired generation's tasks to finish, then
    /// abort the rest. Returns how many had to be aborted.
    pub async fn reap_tasks(&self, grace: Duration) -> usize {
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        self.abort_tasks()
    }

    /// Abort every task still running; returns how many were aborted.
    pub fn abort_tasks(&self) -> usize {
        let mut aborted = 0;
        for h in lock(&self.inner.aborts).drain(..) {
            if !h.is_finished() {
                h.abort();
                aborted += 1;
            }
        }
        aborted
    }
}

impl Drop for LifeController {
    fn drop(&mut self) {
        self.retire();
        self.abort_tasks();
    }
}

/// A plugin's state bound to its generation: created lazily, at most once per
/// generation, and refused once the generation has retired.
pub struct ScopeHandle<T> {
    life: ScopeLife,
    cell: Arc<OnceCell<T>>,
}

impl<T> Clone for ScopeHandle<T> {
    fn clone(&self) -> Self {
        ScopeHandle {
            life: self.life.clone(),
            cell: self.cell.clone(),
        }
    }
}

impl<T> fmt::Debug for ScopeHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeHandle")
            .field("generation", &self.life.generation())
            .field("initialized", &self.cell.get().is_some())
            .field("retired", &self.life.is_retired())
            .finish()
    }
}

impl<T> ScopeHandle<T> {
    /// The state, if it was initialized and the generation is live.
    pub fn get(&self) -> Result<Option<&T>, Retired> {
        self.life.check()?;
        Ok(self.cell.get())
    }

    /// The state, initializing it with `init` on first use.
    pub fn get_or_init(&self, init: impl FnOnce() -> T) -> Result<&T, Retired> {
        self.life.check()?;
        Ok(self.cell.get_or_init(init))
    }

    /// The state, initializing it with a fallible `init` on first use. A
    /// failed init leaves the handle empty so a later call may try again.
    pub fn get_or_try_init<E>(
        &self,
        init: impl FnOnce() -> Result<T, E>,
    ) -> Result<&T, HandleError<E>> {
        self.life.check().map_err(HandleError::Retired)?;
        self.cell.get_or_try_init(init).map_err(HandleError::Init)
    }

    /// The generation this handle belongs to.
    pub fn life(&self) -> &ScopeLife {
        &self.life
    }
}

/// Why [`ScopeHandle::get_or_try_init`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleError<E> {
    /// The generation has retired.
    Retired(Retired),
    /// The initializer failed.
    Init(E),
}

impl<E: fmt::Display> fmt::Display for HandleError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleError::Retired(r) => r.fmt(f),
            HandleError::Init(e) => e.fmt(f),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for HandleError<E> {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the Vec inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn handle_initializes_once_and_refuses_after_retire() {
        let (life, ctl) = ScopeLife::new(7);
        let h = life.handle::<String>();
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            let v = h
                .get_or_init(|| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    "state".to_string()
                })
                .unwrap();
            assert_eq!(v, "state");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let clone = h.clone();
        ctl.retire();
        assert_eq!(clone.get().unwrap_err(), Retired { generation: 7 });
        assert!(h.get_or_init(|| "again".into()).is_err());
        let err: RpcError = Retired { generation: 7 }.into();
        assert_eq!(err.retryable, Some(true));
    }

    #[test]
    fn failed_init_can_be_retried() {
        let (life, _ctl) = ScopeLife::new(1);
        let h = life.handle::<u32>();
        assert_eq!(
            h.get_or_try_init(|| Err::<u32, _>("disk full")),
            Err(HandleError::Init("disk full"))
        );
        assert_eq!(*h.get_or_try_init(|| Ok::<_, &str>(5)).unwrap(), 5);
    }

    #[tokio::test]
    async fn tasks_stop_on_retire_and_spawn_is_refused_after() {
        let (life, ctl) = ScopeLife::new(3);
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        life.spawn(async move {
            loop {
                t.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        ctl.retire();
        assert_eq!(ctl.reap_tasks(Duration::from_secs(1)).await, 0);
        assert_eq!(ctl.running_tasks(), 0);
        let after = ticks.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), after);
        assert!(life.spawn(async {}).is_err());
    }

    #[tokio::test]
    async fn dropping_the_controller_aborts_tasks_that_ignore_cancellation() {
        let (life, ctl) = ScopeLife::new(4);
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        // A task whose future never yields to the cancellation branch because
        // it is itself stuck forever; only abort can end it.
        life.spawn(async move {
            let _guard = SetOnDrop(f);
            std::future::pending::<()>().await;
        })
        .unwrap();
        tokio::task::yield_now().await;
        drop(ctl);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(flag.load(Ordering::SeqCst), "task future was dropped");
        assert!(life.is_retired());
    }

    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}
