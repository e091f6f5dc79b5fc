//! What the codec targets share: the limits an input selects and how it is
//! cut into pieces for chunked re-feeding.

use corvid_registry::mupdate::codec::Limits;

/// The decoder limits a fuzz input's selector byte picks: the defaults,
/// two small fixed sets, or sizes taken from the selector itself.
pub fn limits(sel: u8) -> Limits {
    match sel % 4 {
        0 => Limits::default(),
        1 => Limits {
            max_line: 64,
            max_literal: 32,
            max_args: 4,
        },
        2 => Limits {
            max_line: 16,
            max_literal: 8,
            max_args: 2,
        },
        _ => Limits {
            max_line: 1 + usize::from(sel >> 2),
            max_literal: usize::from(sel >> 2),
            max_args: usize::from(sel >> 5),
        },
    }
}

/// `stream` cut into pieces whose sizes cycle through `sizes` (each at
/// least one byte; one piece when `sizes` is empty).
pub fn pieces<'a>(sizes: &[u8], stream: &'a [u8]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(stream.len(), |&s| usize::from(s).max(1));
        let end = (at + n).min(stream.len());
        pieces.push(&stream[at..end]);
        at = end;
        i += 1;
    }
    pieces
}
