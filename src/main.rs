//! The `raftkv` binary.

fn main() {
    println!("raftkv {}", env!("CARGO_PKG_VERSION"));
}
