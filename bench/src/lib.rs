//! keyfort-bench
