//! Types shared by the eBPF programs and the user-space agent.
//!
//! Everything here is `#[repr(C)]`, `no_std` and free of padding surprises so both sides agree
//! on the byte layout of map keys and values.
#![no_std]
