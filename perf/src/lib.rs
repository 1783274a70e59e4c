//! keyfort-perf
