//! Response caches. The exact cache answers a request identical (in the canonical sense of
//! [`key`]) to an earlier one of the same tenant, route and namespace; the semantic cache one
//! that means the same ([`semantic`]).

pub mod entry;
pub mod exact;
pub mod flight;
pub mod index;
pub mod key;
pub mod semantic;
pub mod verify;
pub mod words;
