//! `raftkv txn --file TXN.json`: one transaction, written as the body of `POST /txn`.
//!
//! The file (`-`: stdin) is checked against the wire shape before anything is sent (an
//! unknown field or a malformed op is a usage error, exit 2). The answer is printed one line
//! per result (or as the server's JSON with `-w json`); the exit code says which branch ran:
//! 0 the compares held and `success` ran, 1 `failure` ran. Other failures exit as every
//! client command does (3 unavailable, 4 outcome unknown, 1 rejected).

use super::kv::{client, failure, runtime, EndpointArgs, ValueFormat};
use super::UsageError;
use raftkv::api::{TxnOpResult, TxnRequest, TxnResponse};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct TxnArgs {
    /// The transaction as JSON: {"compare": [...], "success": [...], "failure": [...]}
    /// (`-` reads stdin).
    #[arg(long, value_name = "TXN.json")]
    pub file: PathBuf,
    /// simple: a line per result; json: the server's answer.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub format: ValueFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

/// Reads and checks the transaction `path` names (`-`: stdin).
fn read_txn(path: &PathBuf) -> Result<TxnRequest, UsageError> {
    let mut text = String::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| UsageError(format!("{} is not a transaction: {e}", path.display())))
}

pub fn run(args: &TxnArgs) -> anyhow::Result<ExitCode> {
    let txn = read_txn(&args.file)?;
    let c = client(&args.endpoints)?;
    let answer = match runtime()?.block_on(c.txn(&txn)) {
        Ok(a) => a,
        Err(e) => return Ok(failure(e)),
    };
    match args.format {
        ValueFormat::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        ValueFormat::Simple => print!("{}", render(&answer)),
    }
    Ok(if answer.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The simple form: which branch ran, then one line per result.
pub fn render(r: &TxnResponse) -> String {
    let mut s = match r.succeeded {
        true => format!("SUCCEEDED (revision {})\n", r.revision),
        false => format!(
            "FAILED: a compare did not hold, the failure branch ran (revision {})\n",
            r.revision
        ),
    };
    for result in &r.results {
        let line = match result {
            TxnOpResult::Put { key, version } => format!("put {key} (version {version})"),
            TxnOpResult::Delete { key, deleted } => format!("delete {key} (deleted {deleted})"),
            TxnOpResult::DeletePrefix { prefix, deleted } => {
                format!("delete_prefix {prefix} (deleted {deleted})")
            }
            TxnOpResult::Get { key, kv: None } => format!("get {key}: not found"),
            TxnOpResult::Get { key, kv: Some(kv) } => format!(
                "get {key} = {} (mod_revision {}, version {})",
                kv.value, kv.mod_revision, kv.version
            ),
        };
        s.push_str(&line);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv::api::KeyValue;

    #[test]
    fn a_transaction_file_is_checked_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            r#"{"compare": [{"key": "lock", "target": "version", "op": "==", "value": 0}],
                "success": [{"put": {"key": "lock", "value": "me"}}],
                "failure": [{"get": {"key": "lock"}}]}"#,
        )
        .unwrap();
        let txn = read_txn(&good).unwrap();
        assert_eq!((txn.compare.len(), txn.success.len()), (1, 1));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"compare": [], "sucess": []}"#).unwrap();
        let err = read_txn(&bad).unwrap_err();
        assert!(err.0.contains("unknown field"), "{err}");
        assert!(read_txn(&dir.path().join("missing.json")).is_err());
    }

    #[test]
    fn results_render_one_line_each() {
        let r = TxnResponse {
            succeeded: false,
            results: vec![
                TxnOpResult::Get {
                    key: "lock".into(),
                    kv: Some(KeyValue {
                        key: "lock".into(),
                        value: "other".into(),
                        create_revision: 4,
                        mod_revision: 4,
                        version: 1,
                    }),
                },
                TxnOpResult::Delete {
                    key: "x".into(),
                    deleted: 0,
                },
            ],
            revision: 9,
            leader: 1,
        };
        assert_eq!(
            render(&r),
            "FAILED: a compare did not hold, the failure branch ran (revision 9)\n\
             get lock = other (mod_revision 4, version 1)\n\
             delete x (deleted 0)\n"
        );
    }
}
