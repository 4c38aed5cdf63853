//! Checks on the text a server sends back (key ids, names, links) before keyfleet stores it,
//! logs it or acts on it: no control characters (Postgres `text` cannot hold a NUL byte, so one
//! in a write-back batch would fail the whole batch; others forge log lines), and sizes a real
//! server never comes near.
//!
//! Single-object responses (create, get key, get link) with a bad field are
//! [`crate::Error::InvalidText`], permanent. Lists degrade per entry instead, see
//! [`crate::VpnClient::list_keys`].

use std::fmt;

use crate::RemoteKey;

/// The longest server key id accepted: a V2Ray uuid is 36 bytes, an Outline id a few digits or
/// keyfleet's own `kf-<subscription>`.
pub const MAX_ID_BYTES: usize = 255;
/// The longest key name (V2Ray email, Outline name) accepted; keyfleet's own are under 100.
pub const MAX_NAME_BYTES: usize = 1024;
/// The longest share link accepted; a Reality `vless://` link is about 300 bytes.
pub const MAX_LINK_BYTES: usize = 16 * 1024;

/// What is wrong with a string, phrased to follow "returned a link …"; never contains the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flaw {
    Empty,
    TooLong { len: usize, max: usize },
    Control { offset: usize, ch: char },
}

impl fmt::Display for Flaw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Empty => f.write_str("that is empty"),
            Self::TooLong { len, max } => write!(f, "of {len} bytes, over the {max}-byte limit"),
            Self::Control { offset, ch: '\0' } => write!(f, "with a NUL byte at offset {offset}"),
            Self::Control { offset, ch } => write!(
                f,
                "with the control character U+{:04X} at offset {offset}",
                u32::from(ch)
            ),
        }
    }
}

fn check(text: &str, max: usize, allow_empty: bool) -> Result<(), Flaw> {
    if text.is_empty() && !allow_empty {
        return Err(Flaw::Empty);
    }
    if text.len() > max {
        return Err(Flaw::TooLong {
            len: text.len(),
            max,
        });
    }
    match text.char_indices().find(|(_, c)| c.is_control()) {
        Some((offset, ch)) => Err(Flaw::Control { offset, ch }),
        None => Ok(()),
    }
}

/// A server key id: not empty, at most [`MAX_ID_BYTES`], no control character.
pub(crate) fn check_id(id: &str) -> Result<(), Flaw> {
    check(id, MAX_ID_BYTES, false)
}

/// A key name or email: at most [`MAX_NAME_BYTES`], no control character (may be empty: Outline
/// keys made by hand often have no name).
pub(crate) fn check_name(name: &str) -> Result<(), Flaw> {
    check(name, MAX_NAME_BYTES, true)
}

/// A share link: not empty, at most [`MAX_LINK_BYTES`], no NUL or other control character (a URI
/// never has one, RFC 3986).
pub(crate) fn check_link(link: &str) -> Result<(), Flaw> {
    check(link, MAX_LINK_BYTES, false)
}

/// A name that failed [`check_name`], made fit to show: control characters become U+FFFD and it
/// is cut to [`MAX_NAME_BYTES`].
pub(crate) fn printable_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = if c.is_control() { '\u{FFFD}' } else { c };
        if out.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The entries of a list whose id passes [`check_id`]; the others are dropped with one warning
/// for the lot: keyfleet can neither store nor address a key by such an id.
pub(crate) fn with_valid_ids<T>(
    server: &str,
    endpoint: &str,
    entries: Vec<T>,
    id: impl Fn(&T) -> &str,
) -> Vec<T> {
    let mut skipped = 0usize;
    let mut first = None;
    let kept: Vec<T> = entries
        .into_iter()
        .filter(|entry| match check_id(id(entry)) {
            Ok(()) => true,
            Err(flaw) => {
                skipped += 1;
                first.get_or_insert(flaw);
                false
            }
        })
        .collect();
    if let Some(flaw) = first {
        tracing::warn!(
            server, endpoint, skipped, first = %format_args!("an id {flaw}"),
            "Skipping list entries whose id keyfleet cannot store or address"
        );
    }
    kept
}

/// `(id, name)` pairs as [`RemoteKey`]s; a name that fails [`check_name`] makes the key foreign
/// (never ours, so never deleted or adopted), shown by [`printable_name`], with one warning for
/// the lot.
pub(crate) fn remote_keys(
    server: &str,
    endpoint: &str,
    entries: impl IntoIterator<Item = (String, String)>,
) -> Vec<RemoteKey> {
    let mut foreign = 0usize;
    let mut first = None;
    let keys = entries
        .into_iter()
        .map(|(server_key_id, name)| match check_name(&name) {
            Ok(()) => RemoteKey {
                owner: keyfleet_core::subscription_of_owned_name(&name),
                server_key_id,
                name,
            },
            Err(flaw) => {
                foreign += 1;
                first.get_or_insert(flaw);
                RemoteKey {
                    owner: None,
                    name: printable_name(&name),
                    server_key_id,
                }
            }
        })
        .collect();
    if let Some(flaw) = first {
        tracing::warn!(
            server, endpoint, foreign, first = %format_args!("a name {flaw}"),
            "Treating keys with an invalid name as not keyfleet's"
        );
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flaws_say_what_and_where() {
        assert_eq!(check_id("4"), Ok(()));
        assert_eq!(check_id(""), Err(Flaw::Empty));
        assert_eq!(
            check_id(&"a".repeat(256)),
            Err(Flaw::TooLong { len: 256, max: 255 })
        );
        assert_eq!(check_id(&"é".repeat(127)), Ok(()));
        assert_eq!(
            check_link("vless://ab\0c").unwrap_err().to_string(),
            "with a NUL byte at offset 10"
        );
        assert_eq!(
            check_name("kf-s1\n").unwrap_err().to_string(),
            "with the control character U+000A at offset 5"
        );
        assert_eq!(
            check_name("é\u{85}").unwrap_err(),
            Flaw::Control {
                offset: 2,
                ch: '\u{85}'
            }
        );
        assert_eq!(check_name(""), Ok(()));
        assert_eq!(check_name(&"n".repeat(MAX_NAME_BYTES)), Ok(()));
        assert!(check_name(&"n".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert_eq!(check_link(""), Err(Flaw::Empty));
        assert!(check_link(&"l".repeat(MAX_LINK_BYTES + 1)).is_err());
        assert_eq!(
            check_link(&"l".repeat(20_000)).unwrap_err().to_string(),
            "of 20000 bytes, over the 16384-byte limit"
        );
    }

    #[test]
    fn lists_drop_bad_ids_and_make_bad_names_foreign() {
        let kept = with_valid_ids("s", "GET /x", vec!["1", "", "a\0", "2"], |id| id);
        assert_eq!(kept, ["1", "2"]);
        let keys = remote_keys(
            "s",
            "GET /x",
            [
                ("1".to_owned(), "kf-s1".to_owned()),
                ("2".to_owned(), "kf-s1\n".to_owned()),
            ],
        );
        assert_eq!(keys[0].owner.as_ref().map(|s| s.as_str()), Some("s1"));
        assert_eq!(
            (keys[1].owner.as_ref(), keys[1].name.as_str()),
            (None, "kf-s1\u{FFFD}")
        );
    }

    #[test]
    fn printable_names() {
        assert_eq!(printable_name("a\0b\tc"), "a\u{FFFD}b\u{FFFD}c");
        let long = printable_name(&"é".repeat(MAX_NAME_BYTES));
        assert_eq!(long.len(), MAX_NAME_BYTES);
        assert!(check_name(&long).is_ok());
    }
}
