//! Every capability of one backend behind one trait object, for the backend tests
//! only: the server itself never bundles them (each service takes the one it uses),
//! but a conformance test drives a whole backend at once.

#![allow(dead_code)]

pub use herald_server::backend::health::Health;
pub use herald_server::backend::nodes::NodeRegistry;
pub use herald_server::backend::presence::PresenceStore;
pub use herald_server::backend::receipts::ReceiptStore;
pub use herald_server::backend::routing::Routing;
pub use herald_server::backend::streams::Streams;
pub use herald_server::backend::users::UserControl;

/// A whole backend under test.
pub trait TestBackend:
    Streams + Routing + PresenceStore + NodeRegistry + UserControl + ReceiptStore + Health
{
}

impl<T> TestBackend for T where
    T: Streams + Routing + PresenceStore + NodeRegistry + UserControl + ReceiptStore + Health
{
}
