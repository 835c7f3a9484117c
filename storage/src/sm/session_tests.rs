//! Placeholder: filled in by the issue-11 storage tests.
