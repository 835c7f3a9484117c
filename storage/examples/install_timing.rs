//! Times snapshot installs without criterion's setup: the state and its snapshot file are
//! built once in a kept directory, then installed `runs` times into fresh state machines, so
//! each change to the install path can be measured (and profiled) in seconds.
//!
//! Run: `cargo run --release -p raftkv-storage --example install_timing -- [dir] [runs] [keys]`
//! (defaults `/tmp/raftkv-install-timing`, 3, 1,000,000; 256-byte values as in
//! `benches/state_machine.rs`); `RAFTKV_INSTALL_THREADS` sets the fill threads.

use raftkv_storage::command::Command;
use raftkv_storage::sm::{StateMachine, StateMachineOptions};
use raftkv_storage::snapshot::{SnapshotOptions, SnapshotStore};
use raftkv_storage::vfs::StdFs;
use raftkv_storage::{Entry, EntryKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const VALUE_BYTES: usize = 256;

/// The node binary's allocator (`src/main.rs`), so the figures are the node's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn put_entry(index: u64, key: u64) -> Entry {
    let mut value = vec![b'v'; VALUE_BYTES];
    value[..8].copy_from_slice(&index.to_le_bytes());
    let payload = Command::Put {
        key: format!("key-{key:012}").into_bytes(),
        value,
    }
    .encode()
    .expect("encode");
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        payload: payload.into(),
    }
}

/// The snapshot store in `dir`, holding a snapshot of `keys` keys (made if missing).
fn prepared_store(dir: &Path, keys: u64) -> SnapshotStore {
    let store = SnapshotStore::open(Arc::new(StdFs), dir, SnapshotOptions::default())
        .expect("snapshot store");
    if !store.list().expect("list").is_empty() {
        return store;
    }
    let sm_dir = tempfile::tempdir_in(dir).expect("tempdir");
    let sm = StateMachine::open(sm_dir.path(), StateMachineOptions::default()).expect("open");
    let mut next = 1;
    while next <= keys {
        let end = (next + 1024).min(keys + 1);
        let batch: Vec<Entry> = (next..end).map(|i| put_entry(i, i)).collect();
        sm.apply(&batch).expect("apply");
        next = end;
    }
    store.create(&sm).expect("create");
    store
}

/// CPU seconds (user + system) of the whole process so far.
fn cpu_s() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Bytes the process has written through `write`-like calls so far (`/proc/self/io` wchar).
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("wchar: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// The default options, with `RAFTKV_INSTALL_THREADS` (if set) as the fill threads.
fn target_options() -> StateMachineOptions {
    let mut opts = StateMachineOptions::default();
    if let Some(threads) = std::env::var("RAFTKV_INSTALL_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        opts.install_threads = threads;
    }
    opts
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/tmp/raftkv-install-timing".into()),
    );
    let runs: usize = args.next().map_or(3, |s| s.parse().expect("runs"));
    let keys: u64 = args.next().map_or(1_000_000, |s| s.parse().expect("keys"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let store = prepared_store(&dir, keys);
    let file = store.list().expect("list").pop().expect("a snapshot file");
    let file_bytes = std::fs::metadata(&file.path).expect("stat").len();
    for run in 0..runs {
        let target_dir = tempfile::tempdir_in(&dir).expect("tempdir");
        let target = StateMachine::open(target_dir.path(), target_options()).expect("open");
        let (cpu0, written0) = (cpu_s(), written_bytes());
        let started = Instant::now();
        let meta = store.install(&file, &target).expect("install");
        let took = started.elapsed().as_secs_f64();
        println!(
            "run {run}: installed index {} ({file_bytes} file bytes) in {took:.3} s: {:.1} MiB/s of file; cpu {:.2} s; written {:.0} MiB",
            meta.index,
            file_bytes as f64 / (1024.0 * 1024.0) / took,
            cpu_s() - cpu0,
            (written_bytes() - written0) as f64 / (1024.0 * 1024.0)
        );
    }
}
