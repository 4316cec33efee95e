//! Shared helpers for Tern benchmarks and the load generator.
