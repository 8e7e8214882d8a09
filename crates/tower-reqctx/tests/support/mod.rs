//! Shared by this crate's integration tests (`mod support;`).
#![allow(dead_code, unreachable_pub)]

pub mod http;
