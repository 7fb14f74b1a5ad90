//! Response caches. The exact cache answers a request identical (in the canonical sense of
//! [`key`]) to an earlier one of the same tenant, route and namespace.

pub mod entry;
pub mod exact;
pub mod flight;
pub mod index;
pub mod key;
pub mod verify;
