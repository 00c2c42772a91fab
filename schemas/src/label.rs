//! Lineage labels: an operator's name for a physical device ("ERP key #3"). One rule for every
//! entry point (the CLI, the HTTP API, NATS commands and the fold, which quarantines an event
//! that breaks it).

use thiserror::Error;

use crate::text::is_dangerous;

/// The longest label, in bytes.
pub const MAX_BYTES: usize = 64;

/// Why a label is refused. The messages name the field (`label`) and never echo a long value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LabelError {
    #[error("label: empty (to remove a label, send null or use --remove)")]
    Empty,
    #[error("label: {0} bytes; at most {MAX_BYTES}")]
    TooLong(usize),
    #[error(
        "label: control, bidirectional or line-breaking characters are not allowed (U+{0:04X})"
    )]
    Control(u32),
    #[error("label: leading or trailing whitespace is not allowed")]
    Whitespace,
}

/// Checks a label: 1..=[`MAX_BYTES`] bytes, no control, bidirectional or line-separator code
/// points ([`crate::text::is_dangerous`]), no leading or trailing whitespace (so a label that
/// looks the same is the same). Any other Unicode is fine.
pub fn check(label: &str) -> Result<(), LabelError> {
    if label.is_empty() {
        return Err(LabelError::Empty);
    }
    if label.len() > MAX_BYTES {
        return Err(LabelError::TooLong(label.len()));
    }
    if let Some(c) = label.chars().find(|c| is_dangerous(*c)) {
        return Err(LabelError::Control(u32::from(c)));
    }
    if label.trim() != label {
        return Err(LabelError::Whitespace);
    }
    Ok(())
}

/// Whether `label` contains `needle`, ignoring case: what `find --label` matches.
pub fn matches(label: &str, needle: &str) -> bool {
    label.to_lowercase().contains(&needle.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_short_printable_and_trimmed() {
        assert_eq!(check("ERP key #3"), Ok(()));
        assert_eq!(check("Lizenz-Dongle «Büro»"), Ok(()));
        assert_eq!(check(&"x".repeat(MAX_BYTES)), Ok(()));
        assert_eq!(check(""), Err(LabelError::Empty));
        assert_eq!(
            check(&"x".repeat(MAX_BYTES + 1)),
            Err(LabelError::TooLong(65))
        );
        // Bytes, not characters: 22 three-byte characters are 66 bytes.
        assert_eq!(check(&"€".repeat(22)), Err(LabelError::TooLong(66)));
        assert_eq!(check("a\x1b[2Jb"), Err(LabelError::Control(0x1b)));
        assert_eq!(check("a\nb"), Err(LabelError::Control(0x0a)));
        assert_eq!(check("key\u{202e}3"), Err(LabelError::Control(0x202e)));
        assert_eq!(check(" key"), Err(LabelError::Whitespace));
        assert!(check("a\x1b")
            .expect_err("control")
            .to_string()
            .starts_with("label: "));
        assert!(matches("ERP key #3", "erp KEY"));
        assert!(!matches("ERP key #3", "#4"));
    }
}
