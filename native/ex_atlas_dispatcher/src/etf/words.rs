//! What a decoded term takes on the heap of the VM the NIF targets, 64-bit Erlang/OTP
//! 25, in words: the layout `scan` counts with (measured: scripts/etf_vectors.exs).
//! Atoms, nil, `{}` (a global literal) and integers in 60 bits are immediates: no words.

use super::Malformed;

/// Integers in `-2^59 ..= 2^59 - 1` are immediates; beyond, bignums.
pub(super) const SMALL_MAGNITUDE_MAX_NEG: u64 = 1 << 59;
/// A bignum: a header, then its magnitude in 64-bit digits.
pub(super) const BIG_HEADER_WORDS: usize = 1;
/// A float: a header and the double.
pub(super) const FLOAT_WORDS: usize = 2;
/// A tuple: a header (arity) and the elements; `{}` is a literal, no words.
pub(super) const TUPLE_HEADER_WORDS: usize = 1;
/// A list cell: head and tail.
pub(super) const CONS_WORDS: usize = 2;
/// Binaries up to this size live on the process heap; larger ones are reference-counted
/// off-heap, the heap holding only a ProcBin.
pub(super) const HEAP_BINARY_MAX: usize = 64;
/// A heap binary: a header and the size word, then its bytes in whole words.
pub(super) const HEAP_BINARY_HEADER_WORDS: usize = 2;
/// A ProcBin: the heap side of an off-heap binary.
pub(super) const PROC_BIN_WORDS: usize = 6;
/// A sub-binary: what a bitstring (not whole bytes) decodes to, on top of its binary.
pub(super) const SUB_BINARY_WORDS: usize = 5;
/// Maps up to this many keys are flat; larger ones hash array mapped tries.
pub(super) const FLATMAP_MAX: usize = 32;
/// A flat map: header, size and keys pointer, then the values; then the keys tuple
/// (a header and the keys), which for no keys is the `{}` literal.
pub(super) const FLATMAP_HEADER_WORDS: usize = 3;
/// A hash map: its root's header and size word, then per key a list cell (the pair) and
/// the word pointing at it, then the inner nodes (a header and one word in their parent
/// each). The nodes depend on the keys' hashes: 3.7 words per key in all on average
/// (the VM itself reserves 3.8 when it decodes one). Over about 560 000 maps of 33 to
/// 1 000 random keys (`elixir scripts/etf_vectors.exs --hashmaps`), the most was 4.33
/// per key, at 33 keys where it varies most, every two words more about 3.5 times
/// rarer. We count 4.5 per key: at 33 keys 151 words, 8 more than the most measured,
/// which by that decay fewer than one map of 33 random keys in a million exceeds;
/// larger maps vary less. That is 1.2 times what the vectors' maps take, at most 1.36
/// times the least measured (3.36 per key). Keys built to collide in their hashes can
/// take more.
pub(super) const HASHMAP_ROOT_WORDS: usize = 2;
/// The words per key a hash map takes, as halves.
pub(super) const HASHMAP_HALF_WORDS_PER_KEY: usize = 9;
/// A pid or port of another node: a header, the node, a link in the off-heap list and
/// one data word. One of this node is an immediate (no words), but the encoding names a
/// node and a creation, which only the running VM can match against its own, so we
/// count the larger.
pub(super) const EXTERNAL_ID_WORDS: usize = 4;
/// A reference of another node: a header, the node and a link, then its count of
/// 32-bit numbers and the numbers, two to a word. One of this node takes 3 words (4 for
/// a pid reference, an alias): never more than another node's with as many numbers.
pub(super) const EXTERNAL_REF_HEADER_WORDS: usize = 3;
/// A fun: a header, a link, the fun entry, arity and free variable count, and the
/// creator pid, then the free variables; the creator may be another node's pid, whose
/// words add up (counted as for any pid).
pub(super) const FUN_WORDS: usize = 5;
/// An export fun (`&Mod.fun/arity`).
pub(super) const EXPORT_WORDS: usize = 5;

/// A binary of `n` bytes: its words, and its bytes again when they are off-heap. A
/// binary's bytes are within the input, so their sum cannot overflow.
#[inline(always)]
pub(super) fn binary_words(n: usize) -> (usize, usize) {
    if n <= HEAP_BINARY_MAX {
        (HEAP_BINARY_HEADER_WORDS + n.div_ceil(8), 0)
    } else {
        (PROC_BIN_WORDS, n)
    }
}

#[inline]
pub(super) fn tuple(arity: usize) -> Result<(usize, usize), Malformed> {
    if arity == 0 {
        return Ok((0, 0));
    }
    let words = arity.checked_add(TUPLE_HEADER_WORDS).ok_or(Malformed)?;
    Ok((words, arity))
}

/// A bignum's words from its little-endian magnitude. The decoder drops zero high
/// bytes (the VM writes none, so this looks at one byte) and makes an immediate of what
/// fits in one.
#[inline]
pub(super) fn big_words(negative: bool, magnitude: &[u8]) -> usize {
    let len = magnitude.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    if len <= 8 {
        let value = magnitude[..len]
            .iter()
            .rev()
            .fold(0u64, |value, &b| value << 8 | u64::from(b));
        let fits = if negative {
            value <= SMALL_MAGNITUDE_MAX_NEG
        } else {
            value < SMALL_MAGNITUDE_MAX_NEG
        };
        if fits {
            return 0;
        }
    }
    BIG_HEADER_WORDS + len.div_ceil(8)
}

#[inline]
pub(super) fn map_words(keys: usize) -> Result<usize, Malformed> {
    if keys == 0 {
        Ok(FLATMAP_HEADER_WORDS)
    } else if keys <= FLATMAP_MAX {
        Ok(FLATMAP_HEADER_WORDS + keys + TUPLE_HEADER_WORDS + keys)
    } else {
        keys.checked_mul(HASHMAP_HALF_WORDS_PER_KEY)
            .map(|halves| HASHMAP_ROOT_WORDS + halves.div_ceil(2))
            .ok_or(Malformed)
    }
}

/// A reference with `numbers` 32-bit numbers, as another node's; they are stored with
/// their count, all in 32-bit halves of words.
#[inline]
pub(super) fn ref_words(numbers: usize) -> usize {
    EXTERNAL_REF_HEADER_WORDS + (numbers + 2) / 2
}

#[inline]
pub(super) fn fun_words(free: usize, creator: usize) -> Result<usize, Malformed> {
    free.checked_add(FUN_WORDS + creator).ok_or(Malformed)
}
