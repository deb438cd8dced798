//! Two small helpers every crate had a copy of.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if a panicking holder poisoned it: every AMST lock guards
/// state that stays consistent between statements, so a panic elsewhere leaves it usable.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lower-case hex, for session ids, digests and fingerprints in logs.
///
/// ```
/// assert_eq!(amst_core::util::hex(&[0x0a, 0xff]), "0aff");
/// ```
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}
