//! `wal-inspect`: read, verify and dump a raftkv node's write-ahead log and snapshots.

fn main() {
    println!("wal-inspect {}", env!("CARGO_PKG_VERSION"));
}
