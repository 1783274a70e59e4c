//! keyfort-net: the frame codec shared by the client and peer protocols (docs/format.md §5).
//! The protocols, the server, the client library and the peer transport come with the
//! replication and service issues.

pub mod client;
pub mod client_proto;
pub mod frame;
pub mod join;
pub mod peer;
pub mod server;
pub mod snapshot_stream;
pub mod tls;
pub mod transport;
