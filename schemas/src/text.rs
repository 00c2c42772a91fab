//! Strings from outside (what a USB device reports: manufacturer, product, serial; anything an
//! event carries) made harmless for people: the one escaping function every human-readable
//! printer uses (CLI tables and `show`s, `events tail`, `history`, log fields), and the bound
//! the agent puts on device strings.
//!
//! The data stays data: events, the view and JSON keep the exact string; only what is printed
//! for a terminal or a log line is escaped. Escaped are the code points a terminal acts on or
//! that change how a line reads: C0 controls (ESC, newline, …), DEL, C1 controls (U+0080–U+009F,
//! including the one-character CSI U+009B), the bidirectional overrides, embeddings, isolates
//! and marks, and the line and paragraph separators; and the backslash itself, so an escaped
//! form cannot be forged by a device that sends the text `\x1b`.

use std::borrow::Cow;
use std::fmt;

/// The most bytes of a device string (manufacturer, product, serial) the agent reports: a USB
/// string descriptor holds at most 126 UTF-16 code units, so real strings fit.
pub const DEVICE_STRING_MAX: usize = 255;

/// What ends a shortened device string (U+2026, three bytes): the event says it was cut.
pub const TRUNCATED: char = '…';

/// True for a code point a terminal may act on or that reorders or breaks a line.
pub fn is_dangerous(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{061c}'
        | '\u{200e}' | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}'
    )
}

/// `s` safe to print: dangerous code points as `\n`, `\r`, `\t`, `\x1b` (ASCII) or `\u{202e}`,
/// the backslash as `\\`; everything else as it is. Borrows when nothing needs escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || is_dangerous(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_dangerous(c) && c.is_ascii() => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if is_dangerous(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`escape`] as a `Display`, for format strings and tracing fields:
/// `warn!(product = %Escaped(&p), …)`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

/// JSON text (as `serde_json` writes it, compact or pretty) safe for a terminal: serde_json
/// escapes C0 controls inside strings but writes DEL, C1 controls and bidirectional controls
/// raw; those become `\uXXXX` escapes, which decode to the same string. Valid because outside
/// strings JSON holds only ASCII punctuation, literals and whitespace; C0 characters are left
/// alone (outside strings they are the pretty printer's newlines and indentation).
pub fn escape_json(json: &str) -> Cow<'_, str> {
    let dangerous = |c: char| c >= ' ' && is_dangerous(c);
    if !json.chars().any(dangerous) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if dangerous(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` cut to at most `max` bytes at a character boundary, ending in [`TRUNCATED`] when cut
/// (`max` must leave room for it); true when it was cut.
pub fn bound(s: String, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let room = max.saturating_sub(TRUNCATED.len_utf8());
    let mut end = room.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = s;
    out.truncate(end);
    out.push(TRUNCATED);
    (out, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_become_visible_text() {
        let hostile = "A\x1b[2J\x1b]0;pwned\x07B\nC\r\tD\u{7f}\u{9b}31m\u{202e}evil\u{2066}\\x1b";
        let e = escape(hostile);
        assert_eq!(
            e,
            "A\\x1b[2J\\x1b]0;pwned\\x07B\\nC\\r\\tD\\x7f\\u{9b}31m\\u{202e}evil\\u{2066}\\\\x1b"
        );
        assert!(!e.chars().any(is_dangerous));
        assert!(matches!(
            escape("YubiKey OTP+FIDO+CCID – ünï"),
            Cow::Borrowed(_)
        ));
        assert_eq!(Escaped("a\nb").to_string(), "a\\nb");
    }

    #[test]
    fn every_dangerous_code_point_is_escaped() {
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let s = c.to_string();
            let e = escape(&s);
            assert!(!e.chars().any(is_dangerous), "{c:?} -> {e:?}");
        }
        for c in [
            '\u{0}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}', '\u{200f}', '\u{2029}',
        ] {
            assert!(is_dangerous(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '€', '…', '\u{a0}'] {
            assert!(!is_dangerous(c), "{c:?}");
        }
    }

    #[test]
    fn json_keeps_its_meaning() {
        let v = serde_json::json!({"product": "x\u{9b}2J\u{202e}y\x1bz\u{7f}\nw", "n": [1, 2]});
        let text = v.to_string();
        let safe = escape_json(&text);
        assert!(!safe.chars().any(is_dangerous), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
        // Pretty JSON keeps its layout; only the strings' dangerous characters change.
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let safe = escape_json(&pretty);
        assert_eq!(safe.lines().count(), pretty.lines().count());
        assert!(
            !safe.chars().any(|c| c != '\n' && is_dangerous(c)),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn bounds_cut_at_a_character_and_say_so() {
        let (s, cut) = bound("a".repeat(255), DEVICE_STRING_MAX);
        assert_eq!((s.len(), cut), (255, false));
        let (s, cut) = bound("a".repeat(900_000), DEVICE_STRING_MAX);
        assert!(
            cut && s.len() <= DEVICE_STRING_MAX && s.ends_with(TRUNCATED),
            "{}",
            s.len()
        );
        let (s, cut) = bound("€".repeat(200), DEVICE_STRING_MAX);
        assert!(cut && s.len() <= DEVICE_STRING_MAX && s.ends_with(TRUNCATED));
        assert_eq!(s.chars().filter(|c| *c == '€').count(), 84);
    }
}
