//! The storage threads' scheduling policy: `SCHED_BATCH` on Linux.
//!
//! The writer, the fsync stage and fjall's flush and compaction workers wake thousands of times
//! a second (a command, a finished fsync, a sealed memtable). Under the default policy each
//! wake-up may preempt the thread that is running, which is most often the runtime thread in
//! the middle of a connection's packets. `SCHED_BATCH` keeps their share of the CPU (same nice
//! value, same weight) but lets them wait for the running thread's slice instead of cutting
//! it short: fewer context switches, and the network thread keeps its caches warm. Measured on
//! the 2-core machines of bench/README.md (session 18), in paired rounds: with 1,000 busy
//! clients, 1.09× the `direct` throughput for 6–13% less server CPU per message; with 100, no
//! clear effect. A woken storage thread now waits longer for a core, which shows in a p99
//! about 10% higher.
//!
//! Setting it needs no privilege. Where it fails (another OS, a sandbox that forbids it), the
//! threads keep the default policy and the server logs a warning for each.

use std::path::Path;

use fjall::Database;

use super::StoreError;

/// Runs the calling thread as `SCHED_BATCH`, keeping its nice value; if that is not possible
/// here, logs a warning naming `thread` and leaves it as it was.
#[cfg(target_os = "linux")]
pub(super) fn run_as_batch(thread: &str) {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    // The crate sets a nice value along with the policy, from a 0–99 scale. Pick the value
    // that maps to the thread's own nice, so the policy is all that changes (lowering a nice
    // value would need a privilege; raising it would give up CPU share).
    let result = rustix::process::getpriority_process(None)
        .map_err(|e| format!("reading the nice value: {e}"))
        .and_then(|nice| {
            (0..=99u8)
                .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
                .map(ThreadPriority::Crossplatform)
                .find(|priority| priority.to_posix(batch).ok() == Some(nice))
                .ok_or_else(|| format!("no priority maps to nice {nice}"))
        })
        .and_then(|priority| {
            set_thread_priority_and_policy(thread_native_id(), priority, batch)
                .map_err(|e| format!("{e:?}"))
        });
    if let Err(reason) = result {
        tracing::warn!(thread, %reason, "SCHED_BATCH refused; keeping the default policy");
    }
}

/// `SCHED_BATCH` is Linux's; elsewhere the storage threads keep the default policy.
#[cfg(not(target_os = "linux"))]
pub(super) fn run_as_batch(_thread: &str) {}

/// Opens the database under `dir`. With `batch`, it is opened on a short-lived thread that
/// runs as `SCHED_BATCH`, because fjall starts its worker threads while opening and they
/// inherit their creator's policy; the calling thread (often the runtime's) keeps its own.
pub(super) fn open_database(dir: &Path, batch: bool) -> Result<Database, StoreError> {
    if !batch {
        return Ok(Database::builder(dir).open()?);
    }
    std::thread::scope(|scope| {
        let opener = std::thread::Builder::new()
            .name("tern-store-open".into())
            .spawn_scoped(scope, || {
                run_as_batch("fjall workers");
                Database::builder(dir).open()
            })
            .map_err(|e| StoreError::Storage(fjall::Error::Io(e)))?;
        match opener.join() {
            Ok(opened) => Ok(opened?),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The scheduling policy in the stat file at `path` (its field 41).
    fn policy_in(path: &str) -> Option<u32> {
        let stat = std::fs::read_to_string(path).ok()?;
        // The command name (field 2) may hold spaces; the fields after it do not.
        let after_name = &stat[stat.rfind(')')? + 2..];
        after_name.split(' ').nth(38)?.parse().ok()
    }

    /// Policies of this process's threads whose name starts with `prefix`.
    fn policies(prefix: &str) -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .filter_map(Result::ok)
            .filter_map(|task| {
                let tid = task.file_name().into_string().ok()?;
                let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                name.starts_with(prefix)
                    .then(|| policy_in(&format!("/proc/self/task/{tid}/stat")))
                    .flatten()
            })
            .collect()
    }

    const SCHED_BATCH: u32 = 3;

    #[test]
    fn storage_threads_run_as_batch_and_the_opener_keeps_its_policy() {
        let own_before = policy_in("/proc/thread-self/stat");
        assert!(own_before.is_some(), "cannot read this thread's policy");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::testing::open(
            &dir,
            crate::store::StoreLimits::unthrottled(crate::store::Durability::Sync),
        )
        .expect("open");
        // Other tests of this process open stores too, all with the default (batch) policy.
        // The threads set their policy as they start, so give them a moment to.
        let prefixes = ["tern-store-writ", "tern-store-sync", "fjall:worker"];
        let all_batch = || {
            prefixes.map(|prefix| {
                let found = policies(prefix);
                (
                    !found.is_empty() && found.iter().all(|&p| p == SCHED_BATCH),
                    prefix,
                    found,
                )
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !all_batch().iter().all(|(ok, ..)| *ok) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for (ok, prefix, found) in all_batch() {
            assert!(ok, "{prefix} threads run with policies {found:?}");
        }
        assert_eq!(
            policy_in("/proc/thread-self/stat"),
            own_before,
            "opening the store changed the calling thread's policy"
        );
        drop(store);
    }
}
