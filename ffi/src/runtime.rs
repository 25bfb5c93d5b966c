//! The tokio runtime the bindings own: foreign callers have none, and the client's I/O
//! (quinn's endpoint driver, timers) must keep running between their calls.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::TernError;

/// Two workers: a phone app has one client, and its work is I/O; more threads would only
/// cost memory and wake-ups.
const WORKER_THREADS: usize = 2;
/// Idle blocking-pool threads (DNS lookups) exit after this, so a quiet app holds no
/// extra threads for long.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(1);

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

pub(crate) fn runtime() -> Result<&'static Runtime, TernError> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKER_THREADS)
                .thread_name("tern-ffi")
                .thread_keep_alive(BLOCKING_KEEP_ALIVE)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| TernError::Internal {
            detail: format!("cannot start the tokio runtime: {e}"),
        })
}

/// Aborts the task when the foreign caller drops (cancels) the call's future.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `work` on the bindings' runtime. UniFFI polls the returned future from the foreign
/// language's executor, which is not tokio; the client's futures need tokio, so they run
/// there and only the join handle is polled from outside.
pub(crate) async fn on_runtime<T, F>(work: F) -> Result<T, TernError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, TernError>> + Send + 'static,
{
    let mut task = AbortOnDrop(runtime()?.spawn(work));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(e) => Err(TernError::Internal {
            detail: format!("task failed: {e}"),
        }),
    }
}
