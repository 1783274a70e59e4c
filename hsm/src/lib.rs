//! keyfort-hsm
