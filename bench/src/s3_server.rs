//! A `keyfort-s3` test server process (tools/src/bin/keyfort-s3.rs: s3s-fs on 127.0.0.1 only)
//! for the drill, the demo and the tests: started on a free port with fresh random
//! credentials, killed on drop.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The line `keyfort-s3` prints once it listens, before the address.
pub const READY_PREFIX: &str = "keyfort-s3 listening on ";

pub struct S3Server {
    child: Child,
    pub addr: SocketAddr,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Server {
    /// Starts `bin` (the `keyfort-s3` binary) serving bucket `bucket` from `root`, with `extra`
    /// arguments (e.g. the test-only `--fault-cut-get-every K`).
    pub fn start(
        bin: &Path,
        root: &Path,
        bucket: &str,
        extra: &[&str],
    ) -> Result<S3Server, String> {
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let access_key = format!("kf{:08x}", rand::random::<u32>());
        let secret_key: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .args(["--bucket", bucket, "--access-key", &access_key])
            .args(["--secret-key", &secret_key])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .ok_or("keyfort-s3: no stdout".to_string())
            .and_then(|out| {
                std::io::BufReader::new(out)
                    .read_line(&mut line)
                    .map_err(|e| format!("keyfort-s3: {e}"))
            });
        let addr = read.and_then(|_| {
            line.trim()
                .strip_prefix(READY_PREFIX)
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .ok_or_else(|| format!("keyfort-s3 did not start (said {:?})", line.trim()))
        });
        match addr {
            Ok(addr) => Ok(S3Server {
                child,
                addr,
                bucket: bucket.to_string(),
                access_key,
                secret_key,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The durable store URL of `prefix` in the bucket (`""`: the bucket's root).
    pub fn url(&self, prefix: &str) -> String {
        let path = if prefix.is_empty() {
            self.bucket.clone()
        } else {
            format!("{}/{prefix}", self.bucket)
        };
        format!("s3://{path}?endpoint=http://{}", self.addr)
    }

    /// The server process (a test signals it or waits for it).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The environment a process needs to reach the server (`DurableStore` reads it).
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
