//! PINs come from a file or an environment variable, never from a command line, and never print.

use crate::error::{CardError, Result};
use std::fmt;
use std::path::Path;

/// Environment variable naming the file that holds the user PIN.
pub const USER_PIN_FILE_ENV: &str = "KEYFORT_PIN_FILE";
/// Environment variable naming the file that holds the security officer PIN.
pub const SO_PIN_FILE_ENV: &str = "KEYFORT_SO_PIN_FILE";
/// Environment variable holding the user PIN itself (for containers that inject secrets as env).
pub const USER_PIN_ENV: &str = "KEYFORT_PIN";
/// Environment variable holding the SO PIN itself.
pub const SO_PIN_ENV: &str = "KEYFORT_SO_PIN";

/// A PIN. `Debug` is redacted so a PIN can never reach a log through `{:?}`.
#[derive(Clone)]
pub struct Pin(String);

impl Pin {
    pub fn new(pin: impl Into<String>) -> Self {
        Pin(pin.into())
    }

    /// Reads a PIN from a file; one trailing newline is dropped.
    pub fn from_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| CardError::io(path, e))?;
        let s = s.strip_suffix('\n').unwrap_or(&s);
        let s = s.strip_suffix('\r').unwrap_or(s);
        if s.is_empty() {
            return Err(CardError::Config(format!(
                "PIN file {} is empty",
                path.display()
            )));
        }
        Ok(Pin(s.to_string()))
    }

    /// The user PIN: `$KEYFORT_PIN_FILE`, else `$KEYFORT_PIN`.
    pub fn user_from_env() -> Result<Self> {
        Self::from_env(USER_PIN_FILE_ENV, USER_PIN_ENV)
    }

    /// The SO PIN: `$KEYFORT_SO_PIN_FILE`, else `$KEYFORT_SO_PIN`.
    pub fn so_from_env() -> Result<Self> {
        Self::from_env(SO_PIN_FILE_ENV, SO_PIN_ENV)
    }

    fn from_env(file_var: &str, value_var: &str) -> Result<Self> {
        if let Ok(p) = std::env::var(file_var) {
            return Self::from_file(Path::new(&p));
        }
        match std::env::var(value_var) {
            Ok(v) if !v.is_empty() => Ok(Pin(v)),
            _ => Err(CardError::Config(format!(
                "set {file_var} (a file holding the PIN) or {value_var}"
            ))),
        }
    }

    /// The PIN as cryptoki wants it (a `SecretString`: it does not print either).
    pub fn auth(&self) -> cryptoki::types::AuthPin {
        cryptoki::types::AuthPin::from(self.0.clone())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}
