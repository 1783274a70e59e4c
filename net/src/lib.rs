//! keyfort-net
