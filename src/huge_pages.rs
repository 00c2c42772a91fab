//! No transparent huge pages in usbpt's processes (ADR 0017).
//!
//! mimalloc advises its arenas for transparent huge pages, so with the kernel's usual `madvise`
//! setting every fresh 2 MiB of heap is a huge page, zeroed whole when first touched. The fold's
//! staging maps, redb's cache and the NATS client's read buffers grow and are freed batch after
//! batch, and on the machines measured that zeroing was a third of the live projector's CPU;
//! an idle agent's few live megabytes were rounded up to whole 2 MiB pages
//! (`docs/performance.md`). Shared by both binaries (`usbpt`, `usbpt-agent`).

/// mimalloc's own switch for them. An operator who sets it decides: `0` turns them off in the
/// allocator, any other value keeps them, and usbpt leaves the process as it is.
pub const ALLOCATOR_KNOB: &str = "MIMALLOC_ALLOW_THP";

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`: every
/// mapping, those made before too), unless the operator set [`ALLOCATOR_KNOB`]. Processes it
/// starts inherit the setting. Returns whether they are off by this call; a kernel without the
/// call (before Linux 3.15) keeps them.
pub fn turn_off() -> bool {
    if std::env::var_os(ALLOCATOR_KNOB).is_some() {
        return false;
    }
    nix::sys::prctl::set_thp_disable(true).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_for_the_process_unless_the_operator_set_the_knob() {
        let status = || std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        if std::env::var_os(ALLOCATOR_KNOB).is_some() {
            assert!(!turn_off(), "the operator's setting stands");
            return;
        }
        assert!(turn_off());
        assert!(nix::sys::prctl::get_thp_disable().expect("PR_GET_THP_DISABLE"));
        // What the kernel reports for the process (Linux ≥ 5.0).
        assert!(
            status().contains("THP_enabled:\t0"),
            "huge pages still enabled: {}",
            status()
        );
    }
}
