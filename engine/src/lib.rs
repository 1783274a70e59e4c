//! keyfort-engine
