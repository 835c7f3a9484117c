//! `raftkv check disk`: arguments and output; the measuring is `raftkv::check_disk`.

use anyhow::Context;
use raftkv::check_disk::{check_disk, CheckDiskOptions, CheckDiskReport, Measurement};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DiskArgs {
    /// Directory on the disk to check (created if missing; the WAL goes in DIR/wal).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,

    /// Entries to write.
    #[arg(long, value_name = "N", default_value_t = CheckDiskOptions::DEFAULT_ENTRIES)]
    pub entries: u64,

    /// Entries per append: one write and one fdatasync per batch.
    #[arg(long, value_name = "B", default_value_t = CheckDiskOptions::DEFAULT_BATCH)]
    pub batch: u64,

    /// Payload bytes per entry.
    #[arg(long, value_name = "BYTES", default_value_t = CheckDiskOptions::DEFAULT_VALUE_BYTES)]
    pub value_size: usize,

    /// Leave the WAL in DIR/wal for `wal-inspect` instead of removing it.
    #[arg(long)]
    pub keep: bool,

    /// Also measure raw writes into a file preallocated with fallocate (unwritten extents).
    #[arg(long)]
    pub fallocated: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DiskArgs) -> anyhow::Result<ExitCode> {
    let mut opts = CheckDiskOptions::new(&args.dir);
    opts.entries = args.entries;
    opts.batch = args.batch;
    opts.value_bytes = args.value_size;
    opts.keep = args.keep;
    opts.fallocated = args.fallocated;
    let report = check_disk(&opts)
        .with_context(|| format!("check disk in {} failed", args.dir.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(render(&report).as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn row(m: &Measurement) -> String {
    format!(
        "  {:<14} {:>12.0} {:>9.2} {:>11.0} {:>9.0} {:>11.0} {:>9.0}\n",
        m.name,
        m.entries_per_s,
        m.mb_per_s,
        m.write_sync_p50_us,
        m.write_sync_p99_us,
        m.fdatasync_p50_us,
        m.fdatasync_p99_us
    )
}

fn render(r: &CheckDiskReport) -> String {
    let mut s = format!(
        "raftkv check disk: {}\n  {} entries of {} bytes in batches of {} ({} writes of up to {} bytes, one fdatasync each)\n\n",
        r.dir, r.entries, r.value_bytes, r.batch, r.wal.writes, r.batch_bytes
    );
    s.push_str(&format!(
        "  {:<14} {:>12} {:>9} {:>11} {:>9} {:>11} {:>9}\n",
        "", "entries/s", "MB/s", "write+sync", "", "fdatasync", ""
    ));
    s.push_str(&format!(
        "  {:<14} {:>12} {:>9} {:>11} {:>9} {:>11} {:>9}\n",
        "", "", "", "p50 us", "p99 us", "p50 us", "p99 us"
    ));
    s.push_str(&row(&r.wal));
    s.push_str(&row(&r.raw));
    if let Some(m) = &r.raw_fallocated {
        s.push_str(&row(m));
    }
    s.push_str(&format!(
        "\n  per batch p50: wal pwrite {:.0} us + other {:.0} us (encode, CRC, rotation); raw pwrite {:.0} us\n",
        r.wal.write_p50_us, r.wal.other_p50_us, r.raw.write_p50_us
    ));
    s.push_str(&format!(
        "  wal/raw throughput ratio: {:.2}\n  wal/raw p50 latency ratio: {:.2}\n",
        r.ratio_wal_raw, r.latency_ratio_wal_raw_p50
    ));
    if r.kept {
        s.push_str(&format!(
            "  WAL kept in {} (inspect it with: wal-inspect {})\n",
            r.wal_dir, r.dir
        ));
    }
    s
}
