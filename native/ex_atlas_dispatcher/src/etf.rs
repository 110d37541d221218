//! What a term holds, read from its external format (`term_to_binary`, version 131,
//! uncompressed) in one pass, before replay keeps the encoding instead of the term.
//!
//! Replay keeps a message as its encoding only when decoding gives the same term back:
//! not when it holds a reference (decoding keeps no NIF resource or `:atomics` array
//! alive) or a local fun (tied to its module's code). And it accounts the memory the
//! decoded term will take: heap words as the VM lays them out, plus the off-heap
//! binaries. [`scan`] learns both without decoding: it runs on every dispatch, so it
//! skips payloads (binaries, atoms, strings) by their length, allocates nothing for
//! ordinary terms, and keeps its own count of the terms still to read instead of
//! recursing, so no nesting overflows the Rust stack.
//!
//! The heap figures are those of the VM the NIF targets, 64-bit Erlang/OTP 25, measured
//! with `:erts_debug.flat_size/1` on decoded terms by `scripts/etf_vectors.exs`, whose
//! output (`etf_vectors.txt`) the tests check [`scan`] against.

mod words;

use smallvec::SmallVec;
use words::{
    big_words, binary_words, fun_words, map_words, ref_words, tuple, CONS_WORDS, EXPORT_WORDS,
    EXTERNAL_ID_WORDS, FLOAT_WORDS, SUB_BINARY_WORDS,
};

/// What one encoded term holds, read from its external format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// The term holds a reference (any kind: NEW_REFERENCE_EXT 114, NEWER_REFERENCE_EXT
    /// 90, REFERENCE_EXT 101) or a local fun (NEW_FUN_EXT 112, FUN_EXT 117). Such a term
    /// cannot be kept as its encoding: decoding does not keep a NIF resource or an
    /// `:atomics` ref alive, and a local fun is tied to its module's code. (EXPORT_EXT
    /// 113, `&Mod.fun/arity`, is fine.)
    pub keeps_alive: bool,
    /// Heap words the decoded term takes on a 64-bit Erlang/OTP 25 VM, as
    /// `:erts_debug.flat_size/1` counts them (so not counting the top-level term word
    /// itself); an upper bound where the exact figure depends on things the encoding
    /// does not show (hash maps over 32 keys, pids/ports/refs that may be local or
    /// external).
    pub heap_words: usize,
    /// Bytes of the off-heap (reference-counted) binaries the decoded term holds:
    /// binaries over 64 bytes, counted whole.
    pub refc_bytes: usize,
}

/// The bytes are not one whole uncompressed term in external format that [`scan`] can
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// The external format's version byte, first in every encoding.
const VERSION: u8 = 131;

/// The tags of the external format (erts/emulator/beam/external.h) that an encoding by
/// this VM may hold, and the old ones it still reads.
mod tag {
    pub const SMALL_INTEGER: u8 = 97;
    pub const INTEGER: u8 = 98;
    pub const NEW_FLOAT: u8 = 70;
    pub const FLOAT: u8 = 99;
    pub const ATOM: u8 = 100;
    pub const SMALL_ATOM: u8 = 115;
    pub const ATOM_UTF8: u8 = 118;
    pub const SMALL_ATOM_UTF8: u8 = 119;
    pub const REFERENCE: u8 = 101;
    pub const NEW_REFERENCE: u8 = 114;
    pub const NEWER_REFERENCE: u8 = 90;
    pub const PORT: u8 = 102;
    pub const NEW_PORT: u8 = 89;
    pub const V4_PORT: u8 = 120;
    pub const PID: u8 = 103;
    pub const NEW_PID: u8 = 88;
    pub const SMALL_TUPLE: u8 = 104;
    pub const LARGE_TUPLE: u8 = 105;
    pub const MAP: u8 = 116;
    pub const NIL: u8 = 106;
    pub const STRING: u8 = 107;
    pub const LIST: u8 = 108;
    pub const BINARY: u8 = 109;
    pub const BIT_BINARY: u8 = 77;
    pub const SMALL_BIG: u8 = 110;
    pub const LARGE_BIG: u8 = 111;
    pub const NEW_FUN: u8 = 112;
    pub const EXPORT: u8 = 113;
    pub const FUN: u8 = 117;
}

/// The VM's most numbers in a reference; the decoder refuses more.
const REF_NUMBERS_MAX: usize = 5;
/// The longest atom name, in characters; UTF-8 takes at most 4 bytes each.
const ATOM_CHARS_MAX: usize = 255;
const ATOM_UTF8_BYTES_MAX: usize = 4 * ATOM_CHARS_MAX;
/// A NEW_FUN_EXT's fixed part after the tag: size, arity, uniq, index and free count.
const NEW_FUN_FIXED_BYTES: usize = 4 + 1 + 16 + 4 + 4;
/// No open NEW_FUN_EXT: a count of pending terms never reaches it (each takes a byte).
const NO_FUN: usize = usize::MAX;

/// Reads `ext` (starting with the version byte 131) once. Err on anything it cannot
/// read: a truncated or unknown tag, trailing bytes, a compressed term (tag 80),
/// ATOM_CACHE_REF (82) — never panics, never overflows (use checked arithmetic for
/// sizes taken from the input).
///
/// It checks the structure (every length within the input, nothing after the term, a
/// fun's size field where its bytes end) and what the VM's decoder refuses cheaply
/// (non-finite floats, bitstring bit counts, reference lengths, atom lengths, the
/// fields of funs), but not payloads: atom names, float strings and map keys are taken
/// as they are (the VM wrote them).
///
/// Every term in the format is written before its elements, so one count of the terms
/// still to read stands for the whole stack of containers a recursive reader would keep:
/// a term takes itself off the count and adds its elements. Each term takes at least
/// one byte, so a count above the bytes left is a lie of the input, refused at once,
/// and the loop runs at most once per byte. The only stack kept is that of the open
/// NEW_FUN_EXTs' ends (their size fields), on the heap past four nested funs.
pub fn scan(ext: &[u8]) -> Result<Shape, Malformed> {
    let (&version, body) = ext.split_first().ok_or(Malformed)?;
    if version != VERSION {
        return Err(Malformed);
    }
    let mut shape = Shape::default();
    let mut pos = 0;
    let mut pending: usize = 1;
    let mut funs = OpenFuns::new();
    while pending > 0 {
        pending -= 1;
        let tag = *body.get(pos).ok_or(Malformed)?;
        // The common tags are read inline, where the position stays in a register (the
        // loop is bound by the chain of loads from one term's length to the next
        // term); the others in `other`.
        let (words, elements) = match common(body, &mut pos, tag, &mut shape.refc_bytes)? {
            Some(counts) => counts,
            None => {
                let item = other(body, pos, tag)?;
                pos = item.end;
                shape.refc_bytes += item.refc_bytes;
                shape.keeps_alive |= item.keeps_alive;
                if let Some(end) = item.fun_end {
                    funs.open(pending, end);
                }
                (item.words, item.elements)
            }
        };
        shape.heap_words = shape.heap_words.checked_add(words).ok_or(Malformed)?;
        if elements > 0 {
            pending = pending.checked_add(elements).ok_or(Malformed)?;
            if pending > body.len() - pos {
                return Err(Malformed);
            }
        }
        funs.close(pending, pos)?;
    }
    if pos != body.len() {
        return Err(Malformed);
    }
    Ok(shape)
}

/// Reads the term of a common tag `tag` at `*pos` (its own bytes, not its elements),
/// moving `*pos` past them and adding its off-heap bytes to `refc_bytes`: its heap
/// words and its count of elements, or `None` for a tag it does not read. `*pos` is
/// within `body`, so `*pos + 9` cannot overflow.
#[inline(always)]
fn common(
    body: &[u8],
    pos: &mut usize,
    tag: u8,
    refc_bytes: &mut usize,
) -> Result<Option<(usize, usize)>, Malformed> {
    let at = *pos;
    let (end, words, elements) = match tag {
        tag::BINARY => {
            let n = u32_at(body, at + 1)?;
            let end = skip(body, at + 5, n)?;
            let (words, refc) = binary_words(n);
            *refc_bytes += refc;
            (end, words, 0)
        }
        tag::SMALL_ATOM_UTF8 | tag::SMALL_ATOM => {
            let n = usize::from(*body.get(at + 1).ok_or(Malformed)?);
            (skip(body, at + 2, n)?, 0, 0)
        }
        t @ (tag::ATOM | tag::ATOM_UTF8) => {
            let n = u16_at(body, at + 1)?;
            if n > atom_bytes_max(t) {
                return Err(Malformed);
            }
            (skip(body, at + 3, n)?, 0, 0)
        }
        tag::SMALL_INTEGER => (skip(body, at + 1, 1)?, 0, 0),
        // 32 bits always fit in an immediate.
        tag::INTEGER => (skip(body, at + 1, 4)?, 0, 0),
        tag::NEW_FLOAT => {
            let bits = u64::from_be_bytes(array_at(body, at + 1)?);
            // The decoder refuses infinities and NaNs: all exponent bits set.
            if (bits >> 52) & 0x7ff == 0x7ff {
                return Err(Malformed);
            }
            (at + 9, FLOAT_WORDS, 0)
        }
        tag::NIL => (at + 1, 0, 0),
        tag::SMALL_TUPLE => {
            let arity = usize::from(*body.get(at + 1).ok_or(Malformed)?);
            let (words, elements) = tuple(arity)?;
            (at + 2, words, elements)
        }
        tag::MAP => {
            let n = u32_at(body, at + 1)?;
            (at + 5, map_words(n)?, n.checked_mul(2).ok_or(Malformed)?)
        }
        tag::LIST => {
            // The elements, then the tail ([] when proper).
            let n = u32_at(body, at + 1)?;
            let words = n.checked_mul(CONS_WORDS).ok_or(Malformed)?;
            (at + 5, words, n.checked_add(1).ok_or(Malformed)?)
        }
        tag::STRING => {
            // A list of small integers, one byte each.
            let n = u16_at(body, at + 1)?;
            (skip(body, at + 3, n)?, n * CONS_WORDS, 0)
        }
        _ => return Ok(None),
    };
    *pos = end;
    Ok(Some((words, elements)))
}

/// The NEW_FUN_EXTs open around the term being read: the innermost one's count of
/// pending terms once its free variables are read, and where its bytes end (by its
/// size field); then the ones outside it, on the heap past four nested funs.
struct OpenFuns {
    level: usize,
    end: usize,
    outer: SmallVec<[(usize, usize); 4]>,
}

impl OpenFuns {
    #[inline(always)]
    fn new() -> Self {
        OpenFuns {
            level: NO_FUN,
            end: 0,
            outer: SmallVec::new(),
        }
    }

    /// A fun opens, whose free variables are read once `pending` is back to what it is
    /// now, and whose bytes end at `end`.
    #[inline(always)]
    fn open(&mut self, pending: usize, end: usize) {
        if self.level != NO_FUN {
            self.outer.push((self.level, self.end));
        }
        (self.level, self.end) = (pending, end);
    }

    /// Closes the funs whose free variables are all read at `pending` terms still to
    /// read: each must end at `pos`.
    #[inline(always)]
    fn close(&mut self, pending: usize, pos: usize) -> Result<(), Malformed> {
        while pending == self.level {
            if pos != self.end {
                return Err(Malformed);
            }
            (self.level, self.end) = self.outer.pop().unwrap_or((NO_FUN, 0));
        }
        Ok(())
    }
}

/// `N` bytes at `at`.
#[inline(always)]
fn array_at<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], Malformed> {
    let end = at.checked_add(N).ok_or(Malformed)?;
    let slice = bytes.get(at..end).ok_or(Malformed)?;
    <[u8; N]>::try_from(slice).map_err(|_| Malformed)
}

#[inline(always)]
fn u16_at(bytes: &[u8], at: usize) -> Result<usize, Malformed> {
    array_at(bytes, at).map(|b| usize::from(u16::from_be_bytes(b)))
}

#[inline(always)]
fn u32_at(bytes: &[u8], at: usize) -> Result<usize, Malformed> {
    let n = u32::from_be_bytes(array_at(bytes, at)?);
    usize::try_from(n).map_err(|_| Malformed)
}

/// The position after `n` bytes from `from`, if they are all there.
#[inline(always)]
fn skip(bytes: &[u8], from: usize, n: usize) -> Result<usize, Malformed> {
    match from.checked_add(n) {
        Some(end) if end <= bytes.len() => Ok(end),
        _ => Err(Malformed),
    }
}

/// The longest name an atom tag may hold, in bytes: the decoder takes at most 255
/// characters, one byte each in Latin-1 (ATOM_EXT), at most four in UTF-8.
#[inline(always)]
fn atom_bytes_max(tag: u8) -> usize {
    if tag == tag::ATOM {
        ATOM_CHARS_MAX
    } else {
        ATOM_UTF8_BYTES_MAX
    }
}

/// One term of the less common tags, read by [`other`].
#[derive(Default)]
struct Item {
    /// The position after the term's own bytes (before its elements).
    end: usize,
    words: usize,
    elements: usize,
    refc_bytes: usize,
    keeps_alive: bool,
    /// Where a NEW_FUN_EXT's bytes end, elements included, by its size field.
    fun_end: Option<usize>,
}

/// Reads the term at `pos` (its tag `tag`, not one `scan` reads itself): its own bytes,
/// not its elements. Kept out of `scan`'s loop so that the loop's state stays in
/// registers.
#[inline(never)]
fn other(bytes: &[u8], pos: usize, tag: u8) -> Result<Item, Malformed> {
    let mut r = Reader {
        bytes,
        pos: pos + 1,
    };
    let mut item = match tag {
        tag::SMALL_BIG | tag::LARGE_BIG | tag::FLOAT | tag::LARGE_TUPLE | tag::BIT_BINARY => {
            r.value(tag)?
        }
        tag::NEW_PID
        | tag::PID
        | tag::PORT
        | tag::NEW_PORT
        | tag::V4_PORT
        | tag::REFERENCE
        | tag::NEW_REFERENCE
        | tag::NEWER_REFERENCE => r.identifier(tag)?,
        tag::NEW_FUN | tag::FUN | tag::EXPORT => r.fun(tag)?,
        // Among others: compressed terms (80), ATOM_CACHE_REF (82) and distribution
        // headers (68), which only a connection's context gives a meaning.
        _ => return Err(Malformed),
    };
    item.end = r.pos;
    Ok(item)
}

/// A cursor over the encoding for [`other`]; every read checks its bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, Malformed> {
        let byte = *self.bytes.get(self.pos).ok_or(Malformed)?;
        self.pos += 1;
        Ok(byte)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let array = array_at(self.bytes, self.pos)?;
        self.pos += N;
        Ok(array)
    }

    fn u16(&mut self) -> Result<usize, Malformed> {
        Ok(usize::from(u16::from_be_bytes(self.array()?)))
    }

    fn u32(&mut self) -> Result<usize, Malformed> {
        usize::try_from(u32::from_be_bytes(self.array()?)).map_err(|_| Malformed)
    }

    /// The next `n` bytes, passed over.
    fn skip(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = skip(self.bytes, self.pos, n)?;
        let skipped = self.bytes.get(self.pos..end).ok_or(Malformed)?;
        self.pos = end;
        Ok(skipped)
    }

    /// An atom in any of its tags (a node name, a fun's module): its name is skipped.
    fn atom(&mut self) -> Result<(), Malformed> {
        let n = match self.u8()? {
            tag::SMALL_ATOM_UTF8 | tag::SMALL_ATOM => usize::from(self.u8()?),
            t @ (tag::ATOM_UTF8 | tag::ATOM) => {
                let n = self.u16()?;
                if n > atom_bytes_max(t) {
                    return Err(Malformed);
                }
                n
            }
            _ => return Err(Malformed),
        };
        self.skip(n).map(drop)
    }

    /// A small integer field of a fun (old index, old uniq, an export's arity): the
    /// decoder takes only an immediate, which the VM writes as SMALL_INTEGER_EXT or
    /// INTEGER_EXT.
    fn fun_integer(&mut self) -> Result<(), Malformed> {
        match self.u8()? {
            tag::SMALL_INTEGER => self.skip(1).map(drop),
            tag::INTEGER => self.skip(4).map(drop),
            _ => Err(Malformed),
        }
    }

    /// A fun's creator pid: its words.
    fn creator(&mut self) -> Result<usize, Malformed> {
        let fields = match self.u8()? {
            tag::PID => 4 + 4 + 1,
            tag::NEW_PID => 4 + 4 + 4,
            _ => return Err(Malformed),
        };
        self.atom()?;
        self.skip(fields)?;
        Ok(EXTERNAL_ID_WORDS)
    }

    /// A bignum, an old float, a large tuple or a bitstring (`tag`).
    fn value(&mut self, tag: u8) -> Result<Item, Malformed> {
        let mut item = Item::default();
        match tag {
            tag::SMALL_BIG => {
                let n = usize::from(self.u8()?);
                let negative = self.u8()? != 0;
                item.words = big_words(negative, self.skip(n)?);
            }
            tag::LARGE_BIG => {
                let n = self.u32()?;
                let negative = self.u8()? != 0;
                item.words = big_words(negative, self.skip(n)?);
            }
            // The old format: the float as a 31-byte string.
            tag::FLOAT => {
                self.skip(31)?;
                item.words = FLOAT_WORDS;
            }
            tag::LARGE_TUPLE => (item.words, item.elements) = tuple(self.u32()?)?,
            _ => {
                let n = self.u32()?;
                let bits = self.u8()?;
                // The bits used of the last byte: 1 to 8, 0 only with no bytes.
                if (bits == 0) != (n == 0) || bits > 8 {
                    return Err(Malformed);
                }
                self.skip(n)?;
                let (words, refc) = binary_words(n);
                let sub = if n > 0 && bits < 8 {
                    SUB_BINARY_WORDS
                } else {
                    0
                };
                (item.words, item.refc_bytes) = (words + sub, refc);
            }
        }
        Ok(item)
    }

    /// A pid, a port or a reference (`tag`).
    fn identifier(&mut self, tag: u8) -> Result<Item, Malformed> {
        let mut item = Item::default();
        match tag {
            tag::REFERENCE => {
                self.atom()?;
                self.skip(4 + 1)?;
                (item.words, item.keeps_alive) = (ref_words(1), true);
            }
            tag::NEW_REFERENCE | tag::NEWER_REFERENCE => {
                let n = self.u16()?;
                // The decoder reads a first number even when the length says none.
                if n == 0 || n > REF_NUMBERS_MAX {
                    return Err(Malformed);
                }
                self.atom()?;
                let creation = if tag == tag::NEW_REFERENCE { 1 } else { 4 };
                self.skip(creation + 4 * n)?;
                (item.words, item.keeps_alive) = (ref_words(n), true);
            }
            _ => {
                self.atom()?;
                self.skip(match tag {
                    tag::NEW_PID => 4 + 4 + 4,
                    tag::PID => 4 + 4 + 1,
                    tag::PORT => 4 + 1,
                    tag::NEW_PORT => 4 + 4,
                    _ => 8 + 4,
                })?;
                item.words = EXTERNAL_ID_WORDS;
            }
        }
        Ok(item)
    }

    /// A fun: a local one (NEW_FUN_EXT, or the old FUN_EXT) or an export (`tag`).
    fn fun(&mut self, tag: u8) -> Result<Item, Malformed> {
        let mut item = Item::default();
        match tag {
            tag::NEW_FUN => {
                // Size, arity, uniq, index, free variable count; the size counts itself
                // and all that follows, free variables included.
                let at = self.pos;
                let fixed = self.array::<NEW_FUN_FIXED_BYTES>()?;
                let [s0, s1, s2, s3, ..] = fixed;
                let size =
                    usize::try_from(u32::from_be_bytes([s0, s1, s2, s3])).map_err(|_| Malformed)?;
                let [.., f0, f1, f2, f3] = fixed;
                let free =
                    usize::try_from(u32::from_be_bytes([f0, f1, f2, f3])).map_err(|_| Malformed)?;
                self.atom()?;
                self.fun_integer()?;
                self.fun_integer()?;
                let creator = self.creator()?;
                item.fun_end = Some(at.checked_add(size).ok_or(Malformed)?);
                (item.words, item.elements) = (fun_words(free, creator)?, free);
                item.keeps_alive = true;
            }
            tag::FUN => {
                // The old format, which this VM no longer decodes: free variable count,
                // creator, module, index, uniq, then the free variables.
                let free = self.u32()?;
                let creator = self.creator()?;
                self.atom()?;
                self.fun_integer()?;
                self.fun_integer()?;
                (item.words, item.elements) = (fun_words(free, creator)?, free);
                item.keeps_alive = true;
            }
            _ => {
                self.atom()?;
                self.atom()?;
                self.fun_integer()?;
                item.words = EXPORT_WORDS;
            }
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A term the VM decoded (scripts/etf_vectors.exs): what it found, and how the scan's
    /// heap figure must relate to it.
    struct Vector {
        name: &'static str,
        fit: &'static str,
        heap_words: usize,
        refc_bytes: usize,
        keeps_alive: bool,
        ext: Vec<u8>,
    }

    fn hex(s: &str) -> Vec<u8> {
        assert!(s.len().is_multiple_of(2), "odd hex");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn vectors() -> Vec<Vector> {
        include_str!("etf_vectors.txt")
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                assert_eq!(fields.len(), 6, "{line}");
                Vector {
                    name: fields[0],
                    fit: fields[1],
                    heap_words: fields[2].parse().expect("heap_words"),
                    refc_bytes: fields[3].parse().expect("refc_bytes"),
                    keeps_alive: fields[4].parse().expect("keeps_alive"),
                    ext: hex(fields[5]),
                }
            })
            .collect()
    }

    fn vector(name: &str) -> Vec<u8> {
        let found = vectors().into_iter().find(|v| v.name == name);
        found.expect("no such vector").ext
    }

    #[test]
    fn etf_scan_agrees_with_the_vm_on_every_vector() {
        let vectors = vectors();
        assert!(vectors.len() > 150, "{} vectors", vectors.len());
        for v in &vectors {
            let shape = scan(&v.ext).unwrap_or_else(|_| panic!("{}: malformed", v.name));
            assert_eq!(shape.keeps_alive, v.keeps_alive, "{}: keeps_alive", v.name);
            assert_eq!(shape.refc_bytes, v.refc_bytes, "{}: refc_bytes", v.name);
            let (scanned, actual) = (shape.heap_words, v.heap_words);
            match v.fit {
                "exact" => assert_eq!(scanned, actual, "{}: heap_words", v.name),
                "bound" => assert!(scanned >= actual, "{}: {scanned} < {actual}", v.name),
                "near" => assert!(
                    scanned >= actual && scanned * 2 <= actual * 3,
                    "{}: {scanned} not within [{actual}, 1.5 x {actual}]",
                    v.name
                ),
                fit => panic!("{}: fit {fit}", v.name),
            }
        }
    }

    /// The local pids, ports and refs the VM stores in fewer words than another node's
    /// count as another node's: the vectors of other nodes' are exact, so these are
    /// bounds by exactly the difference.
    #[test]
    fn etf_local_identifiers_count_as_other_nodes() {
        for (name, words) in [
            ("pid_local", 4),
            ("port_local", 4),
            ("ref_local", 5),
            ("ref_local_magic_atomics", 5),
            ("ref_local_alias", 5),
            ("crafted_ref_local_old_ext", 4),
            ("fun_local_0", 9),
            ("fun_local_1", 10),
        ] {
            assert_eq!(
                scan(&vector(name)).map(|s| s.heap_words),
                Ok(words),
                "{name}"
            );
        }
    }

    #[test]
    fn etf_every_truncation_is_malformed() {
        for v in vectors() {
            for cut in 0..v.ext.len() {
                assert_eq!(
                    scan(&v.ext[..cut]),
                    Err(Malformed),
                    "{} cut at {cut}",
                    v.name
                );
            }
        }
    }

    #[test]
    fn etf_trailing_bytes_are_malformed() {
        for v in vectors() {
            for extra in [0u8, tag::NIL, tag::SMALL_INTEGER] {
                let mut ext = v.ext.clone();
                ext.push(extra);
                assert_eq!(scan(&ext), Err(Malformed), "{} + {extra}", v.name);
            }
        }
    }

    #[test]
    fn etf_needs_the_version_byte() {
        assert_eq!(scan(&[]), Err(Malformed));
        assert_eq!(scan(&[VERSION]), Err(Malformed));
        assert_eq!(scan(&[tag::NIL]), Err(Malformed));
        assert_eq!(scan(&[130, tag::NIL]), Err(Malformed));
        assert_eq!(scan(&[VERSION, tag::NIL]).map(|s| s.heap_words), Ok(0));
    }

    #[test]
    fn etf_unknown_and_contextual_tags_are_malformed() {
        let known = [
            97, 98, 70, 99, 100, 115, 118, 119, 101, 114, 90, 102, 89, 120, 103, 88, 104, 105, 116,
            106, 107, 108, 109, 77, 110, 111, 112, 113, 117,
        ];
        for t in 0..=u8::MAX {
            if known.contains(&t) {
                continue;
            }
            let mut ext = vec![VERSION, t];
            ext.extend_from_slice(&[0; 64]);
            assert_eq!(scan(&ext), Err(Malformed), "tag {t}");
            ext.truncate(2);
            assert_eq!(scan(&ext), Err(Malformed), "tag {t}");
        }
        // `:erlang.term_to_binary(:binary.copy("a", 100), compressed: 9)`.
        let compressed = hex("835000000069789ccb65606048a4030000ce7526b6");
        assert_eq!(scan(&compressed), Err(Malformed));
        // ATOM_CACHE_REF: an index into a connection's cache.
        assert_eq!(scan(&[VERSION, 82, 0]), Err(Malformed));
        // An atom cache reference as a pid's node name.
        assert_eq!(
            scan(&[VERSION, 88, 82, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(Malformed)
        );
    }

    /// `body` (after the version byte) as a whole encoding.
    fn ext(body: &[u8]) -> Vec<u8> {
        let mut ext = vec![VERSION];
        ext.extend_from_slice(body);
        ext
    }

    /// SMALL_ATOM_UTF8_EXT.
    fn atom(name: &str) -> Vec<u8> {
        let mut bytes = vec![tag::SMALL_ATOM_UTF8, name.len() as u8];
        bytes.extend_from_slice(name.as_bytes());
        bytes
    }

    /// NEW_PID_EXT of node `n@h`.
    fn pid() -> Vec<u8> {
        let mut bytes = vec![tag::NEW_PID];
        bytes.extend(atom("n@h"));
        bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3]);
        bytes
    }

    /// NEW_FUN_EXT holding `free` (encoded free variables, concatenated), its size field
    /// off by `size_error`.
    fn new_fun(free_count: u32, free: &[u8], size_error: i64) -> Vec<u8> {
        let mut rest = vec![0];
        rest.extend_from_slice(&[7; 16]);
        rest.extend_from_slice(&3u32.to_be_bytes());
        rest.extend_from_slice(&free_count.to_be_bytes());
        rest.extend(atom("m"));
        rest.extend_from_slice(&[tag::SMALL_INTEGER, 1, tag::INTEGER, 0, 0, 0, 9]);
        rest.extend(pid());
        rest.extend_from_slice(free);
        let size = (4 + rest.len() as i64 + size_error) as u32;
        let mut bytes = vec![tag::NEW_FUN];
        bytes.extend_from_slice(&size.to_be_bytes());
        bytes.extend(rest);
        bytes
    }

    #[test]
    fn etf_refuses_what_the_decoder_refuses() {
        let refused: &[(&str, Vec<u8>)] = &[
            ("NaN", ext(&[tag::NEW_FLOAT, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0])),
            (
                "infinity",
                ext(&[tag::NEW_FLOAT, 0xff, 0xf0, 0, 0, 0, 0, 0, 0]),
            ),
            (
                "bits 0 of a byte",
                ext(&[tag::BIT_BINARY, 0, 0, 0, 1, 0, 0]),
            ),
            (
                "bits 9 of a byte",
                ext(&[tag::BIT_BINARY, 0, 0, 0, 1, 9, 0]),
            ),
            ("bits 8 of no byte", ext(&[tag::BIT_BINARY, 0, 0, 0, 0, 8])),
            ("ref of no number", {
                let mut b = vec![tag::NEWER_REFERENCE, 0, 0];
                b.extend(atom("n@h"));
                b.extend_from_slice(&[0, 0, 0, 3]);
                ext(&b)
            }),
            ("ref of 6 numbers", {
                let mut b = vec![tag::NEWER_REFERENCE, 0, 6];
                b.extend(atom("n@h"));
                b.extend_from_slice(&[0; 4 + 6 * 4]);
                ext(&b)
            }),
            ("latin-1 atom of 256", {
                let mut b = vec![tag::ATOM, 1, 0];
                b.extend_from_slice(&[b'a'; 256]);
                ext(&b)
            }),
            ("utf-8 atom of 1021 bytes", {
                let mut b = vec![tag::ATOM_UTF8, 0x03, 0xfd];
                b.extend_from_slice(&[b'a'; 1021]);
                ext(&b)
            }),
            ("fun size short by one", ext(&new_fun(0, &[], -1))),
            ("fun size long by one", ext(&new_fun(0, &[], 1))),
            ("fun size long by one, trailing byte", {
                let mut b = new_fun(0, &[], 1);
                b.push(tag::NIL);
                ext(&b)
            }),
            ("fun with a float for old index", {
                let mut f = new_fun(0, &[], 0);
                let at = f.len() - pid().len() - 7;
                f[at] = tag::NEW_FLOAT;
                ext(&f)
            }),
            ("fun created by a port", {
                let mut f = new_fun(0, &[], 0);
                let at = f.len() - pid().len();
                f[at] = tag::NEW_PORT;
                ext(&f)
            }),
            (
                "export of a non-atom module",
                ext(&[tag::EXPORT, 97, 0, 119, 1, b'f', 97, 0]),
            ),
            ("export of a bignum arity", {
                let mut b = vec![tag::EXPORT];
                b.extend(atom("m"));
                b.extend(atom("f"));
                b.extend_from_slice(&[tag::SMALL_BIG, 1, 0, 1]);
                ext(&b)
            }),
            (
                "tuple longer than the input",
                ext(&[tag::LARGE_TUPLE, 0xff, 0xff, 0xff, 0xff]),
            ),
            (
                "map longer than the input",
                ext(&[tag::MAP, 0xff, 0xff, 0xff, 0xff, 106]),
            ),
            (
                "list longer than the input",
                ext(&[tag::LIST, 0xff, 0xff, 0xff, 0xff, 106]),
            ),
            (
                "binary longer than the input",
                ext(&[tag::BINARY, 0xff, 0xff, 0xff, 0xff, 0]),
            ),
            (
                "bignum longer than the input",
                ext(&[tag::LARGE_BIG, 0xff, 0xff, 0xff, 0xff, 0]),
            ),
            ("fun with free variables beyond the input", {
                let mut b = new_fun(u32::MAX, &[], 0);
                b.push(tag::NIL);
                ext(&b)
            }),
        ];
        for (what, bytes) in refused {
            assert_eq!(scan(bytes), Err(Malformed), "{what}");
        }
        // The same, well formed.
        let accepted: &[(&str, Vec<u8>, usize)] = &[
            (
                "bits 8 of a byte",
                ext(&[tag::BIT_BINARY, 0, 0, 0, 1, 8, 0]),
                3,
            ),
            (
                "latin-1 atom of 255",
                {
                    let mut b = vec![tag::ATOM, 0, 255];
                    b.extend_from_slice(&[b'a'; 255]);
                    ext(&b)
                },
                0,
            ),
            ("fun", ext(&new_fun(0, &[], 0)), 9),
        ];
        for (what, bytes, words) in accepted {
            assert_eq!(scan(bytes).map(|s| s.heap_words), Ok(*words), "{what}");
        }
    }

    #[test]
    fn etf_nested_funs_check_each_size() {
        let inner = new_fun(0, &[], 0);
        let mut free = inner.clone();
        free.extend_from_slice(&[tag::SMALL_INTEGER, 5]);
        // An outer fun of two free variables: the inner fun, then an integer.
        let outer = ext(&new_fun(2, &free, 0));
        let shape = scan(&outer).expect("well formed");
        assert_eq!(shape.heap_words, (5 + 2 + 4) + (5 + 4));
        assert!(shape.keeps_alive);

        // The inner fun's size off by one each way, the outer's fixed to match.
        for error in [-1, 1] {
            let mut free = new_fun(0, &[], error);
            free.extend_from_slice(&[tag::SMALL_INTEGER, 5]);
            assert_eq!(scan(&ext(&new_fun(2, &free, 0))), Err(Malformed), "{error}");
        }
        // An inner fun whose size covers the integer that follows it.
        let mut free = new_fun(0, &[], 2);
        free.extend_from_slice(&[tag::SMALL_INTEGER, 5]);
        assert_eq!(scan(&ext(&new_fun(2, &free, 0))), Err(Malformed));
        // Two funs ending together: the inner one is the outer's last free variable.
        let mut free = vec![tag::NIL];
        free.extend(new_fun(1, &[tag::NIL], 0));
        assert_eq!(
            scan(&ext(&new_fun(2, &free, 0))).map(|s| s.heap_words),
            Ok((5 + 2 + 4) + (5 + 1 + 4))
        );
    }

    #[test]
    fn etf_reads_the_old_fun_ext() {
        // FUN_EXT: free count, creator, module, index, uniq, then the free variables
        // (here 1.5 and an external pid).
        let mut b = vec![tag::FUN, 0, 0, 0, 2];
        b.extend(pid());
        b.extend(atom("m"));
        b.extend_from_slice(&[tag::SMALL_INTEGER, 0, tag::SMALL_INTEGER, 0]);
        b.extend_from_slice(&[tag::NEW_FLOAT, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        b.extend(pid());
        let shape = scan(&ext(&b)).expect("well formed");
        assert_eq!(
            shape,
            Shape {
                keeps_alive: true,
                heap_words: (5 + 2 + 4) + 2 + 4,
                refc_bytes: 0
            }
        );
    }

    const DEPTH: usize = 1_000_000;

    #[test]
    fn etf_deep_nesting_does_not_recurse() {
        // [[[...[]...]]]: each level a one-element LIST_EXT, its tail after its element.
        let mut lists = vec![VERSION];
        for _ in 0..DEPTH {
            lists.extend_from_slice(&[tag::LIST, 0, 0, 0, 1]);
        }
        lists.push(tag::NIL);
        lists.extend(std::iter::repeat_n(tag::NIL, DEPTH));
        assert_eq!(scan(&lists).map(|s| s.heap_words), Ok(2 * DEPTH));
        lists.pop();
        assert_eq!(scan(&lists), Err(Malformed));

        // {{{...{}...}}}
        let mut tuples = vec![VERSION];
        tuples.extend(std::iter::repeat_n([tag::SMALL_TUPLE, 1], DEPTH).flatten());
        tuples.extend_from_slice(&[tag::SMALL_TUPLE, 0]);
        assert_eq!(scan(&tuples).map(|s| s.heap_words), Ok(2 * DEPTH));

        // %{0 => %{0 => ... %{} ...}}
        let mut maps = vec![VERSION];
        for _ in 0..DEPTH {
            maps.extend_from_slice(&[tag::MAP, 0, 0, 0, 1, tag::SMALL_INTEGER, 0]);
        }
        maps.extend_from_slice(&[tag::MAP, 0, 0, 0, 0]);
        assert_eq!(scan(&maps).map(|s| s.heap_words), Ok(6 * DEPTH + 3));
    }

    #[test]
    fn etf_deeply_nested_funs_check_their_sizes() {
        // fun -> fun -> ... each the only free variable of the one outside it: each
        // fun's size counts the ones inside, so the header's size is computed from the
        // innermost out.
        const FUNS: usize = 100_000;
        let innermost = new_fun(0, &[], 0);
        let header = {
            let mut h = new_fun(1, &[], 0);
            h.drain(..5);
            h
        };
        let mut sizes = vec![innermost.len() - 1];
        for _ in 1..FUNS {
            let inner = sizes.last().copied().unwrap_or_default() + 1;
            sizes.push(4 + header.len() + inner);
        }
        let mut b = vec![VERSION];
        for size in sizes.iter().skip(1).rev() {
            b.push(tag::NEW_FUN);
            b.extend_from_slice(&(*size as u32).to_be_bytes());
            b.extend_from_slice(&header);
        }
        b.extend_from_slice(&innermost);
        let shape = scan(&b).expect("well formed");
        assert_eq!(shape.heap_words, (FUNS - 1) * (5 + 1 + 4) + (5 + 4));
        // The outermost fun's size one short: only its own end is off.
        let outermost = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
        b[2..6].copy_from_slice(&(outermost - 1).to_be_bytes());
        assert_eq!(scan(&b), Err(Malformed));
    }

    /// xorshift64*: enough randomness for mutations and generated terms.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn etf_mutated_vectors_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut read = 0;
        for v in vectors().into_iter().filter(|v| v.ext.len() < 4_096) {
            for _ in 0..200 {
                let mut ext = v.ext.clone();
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(ext.len());
                    match rng.below(3) {
                        0 => ext[at] = rng.next() as u8,
                        1 => ext[at] ^= 1 << rng.below(8),
                        _ => {
                            ext.remove(at);
                            if ext.is_empty() {
                                break;
                            }
                        }
                    }
                }
                read += usize::from(scan(&ext).is_ok());
            }
        }
        // Some mutations (a payload byte) leave a well-formed term.
        assert!(read > 0);
    }

    /// A random term, encoded, with its shape as worked out here, by recursion over the
    /// term (shallow), from the layout in words spelled out again.
    fn random_term(rng: &mut Rng, depth: usize, out: &mut Vec<u8>) -> Shape {
        let leaf = depth == 0 || rng.below(3) == 0;
        let kind = if leaf { rng.below(9) } else { 9 + rng.below(5) };
        let mut shape = Shape::default();
        let mut add = |s: Shape| {
            shape.heap_words += s.heap_words;
            shape.refc_bytes += s.refc_bytes;
            shape.keeps_alive |= s.keeps_alive;
        };
        match kind {
            0 => out.extend_from_slice(&[tag::SMALL_INTEGER, rng.next() as u8]),
            1 => {
                out.push(tag::INTEGER);
                out.extend_from_slice(&(rng.next() as u32).to_be_bytes());
            }
            2 => {
                // 1 to 20 magnitude bytes, the top one not zero.
                let n = 1 + rng.below(20);
                out.extend_from_slice(&[tag::SMALL_BIG, n as u8, rng.below(2) as u8]);
                for i in 0..n {
                    out.push(if i == n - 1 {
                        1 + rng.below(255) as u8
                    } else {
                        rng.next() as u8
                    });
                }
                // Eight bytes may or may not fit in an immediate: left to the vectors,
                // the bignum replaced by [].
                if n == 8 {
                    out.truncate(out.len() - (3 + n));
                    out.push(tag::NIL);
                }
                let words = if n <= 8 { 0 } else { 1 + n.div_ceil(8) };
                add(Shape {
                    heap_words: words,
                    ..Shape::default()
                });
            }
            3 => {
                out.push(tag::NEW_FLOAT);
                out.extend_from_slice(&(rng.below(1000) as f64).to_bits().to_be_bytes());
                add(Shape {
                    heap_words: 2,
                    ..Shape::default()
                });
            }
            4 => out.extend(atom(["ok", "error", "a@b", ""][rng.below(4)])),
            5 => {
                let n = [0, 1, 8, 9, 64, 65, 200][rng.below(7)];
                out.push(tag::BINARY);
                out.extend_from_slice(&(n as u32).to_be_bytes());
                out.extend(std::iter::repeat_n(0xab, n));
                let (words, refc) = if n <= 64 {
                    (2 + n.div_ceil(8), 0)
                } else {
                    (6, n)
                };
                add(Shape {
                    heap_words: words,
                    refc_bytes: refc,
                    ..Shape::default()
                });
            }
            6 => {
                let n = rng.below(5);
                out.extend_from_slice(&[tag::STRING, 0, n as u8]);
                out.extend(std::iter::repeat_n(b'x', n));
                add(Shape {
                    heap_words: 2 * n,
                    ..Shape::default()
                });
            }
            7 => {
                let n = 1 + rng.below(5);
                out.extend_from_slice(&[tag::NEWER_REFERENCE, 0, n as u8]);
                out.extend(atom("a@b"));
                out.extend(std::iter::repeat_n(1, 4 + 4 * n));
                add(Shape {
                    keeps_alive: true,
                    heap_words: 3 + (n + 2) / 2,
                    refc_bytes: 0,
                });
            }
            8 => {
                out.extend(pid());
                add(Shape {
                    heap_words: 4,
                    ..Shape::default()
                });
            }
            9 => {
                let n = rng.below(4);
                out.extend_from_slice(&[tag::SMALL_TUPLE, n as u8]);
                add(Shape {
                    heap_words: if n == 0 { 0 } else { 1 + n },
                    ..Shape::default()
                });
                for _ in 0..n {
                    add(random_term(rng, depth - 1, out));
                }
            }
            10 => {
                let n = rng.below(4);
                out.push(tag::LIST);
                out.extend_from_slice(&(n as u32).to_be_bytes());
                add(Shape {
                    heap_words: 2 * n,
                    ..Shape::default()
                });
                for _ in 0..=n {
                    add(random_term(rng, depth - 1, out));
                }
            }
            11 => {
                let n = rng.below(4);
                out.push(tag::MAP);
                out.extend_from_slice(&(n as u32).to_be_bytes());
                add(Shape {
                    heap_words: if n == 0 { 3 } else { 4 + 2 * n },
                    ..Shape::default()
                });
                for _ in 0..2 * n {
                    add(random_term(rng, depth - 1, out));
                }
            }
            12 => {
                let n = rng.below(3);
                let mut free = Vec::new();
                for _ in 0..n {
                    add(random_term(rng, depth - 1, &mut free));
                }
                out.extend(new_fun(n as u32, &free, 0));
                add(Shape {
                    keeps_alive: true,
                    heap_words: 5 + n + 4,
                    refc_bytes: 0,
                });
            }
            _ => {
                let bits = 1 + rng.below(7);
                let n = [1, 64, 65][rng.below(3)];
                out.push(tag::BIT_BINARY);
                out.extend_from_slice(&(n as u32).to_be_bytes());
                out.push(bits as u8);
                out.extend(std::iter::repeat_n(0, n));
                let (words, refc) = if n <= 64 {
                    (2 + n.div_ceil(8), 0)
                } else {
                    (6, n)
                };
                add(Shape {
                    heap_words: words + 5,
                    refc_bytes: refc,
                    ..Shape::default()
                });
            }
        }
        shape
    }

    #[test]
    fn etf_random_terms_scan_as_built() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..2_000 {
            let mut ext = vec![VERSION];
            let expected = random_term(&mut rng, 5, &mut ext);
            assert_eq!(scan(&ext), Ok(expected), "{ext:02x?}");
            let cut = rng.below(ext.len());
            assert_eq!(scan(&ext[..cut]), Err(Malformed), "{ext:02x?} cut at {cut}");
        }
    }

    /// The figure the module's doc promises: `cargo test --release -p ex_atlas_dispatcher
    /// etf_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn etf_timing_log_batch() {
        let batch = vector("log_batch");
        let runs = 100_000;
        // The best of a few rounds, as other load on the machine only slows a round.
        let mut rounds: Vec<_> = (0..15)
            .map(|_| {
                let start = std::time::Instant::now();
                for _ in 0..runs {
                    let shape = scan(std::hint::black_box(&batch));
                    std::hint::black_box(shape).expect("well formed");
                }
                start.elapsed() / runs
            })
            .collect();
        rounds.sort();
        println!(
            "scan of the {} B log batch: best {:?}, median {:?}",
            batch.len(),
            rounds[0],
            rounds[rounds.len() / 2]
        );
    }
}
