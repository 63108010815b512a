//! Hostile GGUF files: every number read from the file (counts, lengths,
//! dimensions, offsets, the alignment) is checked before it is used in
//! arithmetic or an allocation. Such a file gives one error naming the file,
//! never a panic, an overflow or an allocation sized by the attacker.

use sparsec_models::gguf::GgufFile;
use sparsec_models::ModelError;

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Header with the given counts; the caller appends the rest.
fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(n_tensors.to_le_bytes());
    out.extend(n_kv.to_le_bytes());
    out
}

/// One tensor info: name, dims (ggml order), type, offset.
fn tensor_info(out: &mut Vec<u8>, name: &str, dims: &[u64], ty: u32, offset: u64) {
    gstr(out, name);
    out.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend(d.to_le_bytes());
    }
    out.extend(ty.to_le_bytes());
    out.extend(offset.to_le_bytes());
}

/// A file with one tensor info and `data` bytes of data after 32-alignment.
fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut out = header(1, 0);
    tensor_info(&mut out, "t", dims, ty, offset);
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(0u8, data));
    out
}

fn open(bytes: &[u8]) -> Result<GgufFile, ModelError> {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("hostile.gguf");
    std::fs::write(&p, bytes).unwrap();
    GgufFile::open(&p)
}

/// Opens `bytes`, expecting an error that names the file and contains `needle`.
fn open_err(bytes: &[u8], needle: &str) -> String {
    match open(bytes) {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => {
            let s = e.to_string();
            assert!(matches!(e, ModelError::Format { .. }), "{e:?}");
            assert!(s.contains("hostile.gguf"), "error does not name the file: {s}");
            assert!(s.contains(needle), "error {s:?} lacks {needle:?}");
            s
        }
    }
}

#[test]
fn a_well_formed_file_opens() {
    // The baseline the hostile variants below differ from.
    let g = open(&one_tensor(&[4, 2], 0, 0, 32)).unwrap();
    assert_eq!(g.tensor("t").unwrap().shape(), vec![2, 4]);
    assert_eq!(g.dequantize("t").unwrap().1, vec![0.0; 8]);
}

#[test]
fn offsets_past_the_end_do_not_overflow() {
    // data_start + offset overflows u64 (the offset is aligned).
    open_err(&one_tensor(&[4], 0, u64::MAX - 31, 16), "truncated: tensor `t` needs 16 bytes");
    open_err(&one_tensor(&[4], 0, 1 << 62, 16), "truncated: tensor `t`");
    // Offset + length just past the end of the file.
    open_err(&one_tensor(&[4], 0, 32, 40), "truncated: tensor `t`");
    // An unaligned offset.
    open_err(&one_tensor(&[4], 0, 3, 64), "offset 3 is not aligned to 32");
}

#[test]
fn sizes_that_overflow_are_refused() {
    // Dimensions whose product overflows u64.
    open_err(&one_tensor(&[1 << 32, 1 << 32, 1 << 32], 0, 0, 0), "tensor `t` is too large");
    // Elements that fit, bytes that do not: F32 (×4) and Q8_0 (34 bytes per 32).
    open_err(&one_tensor(&[1 << 62, 2], 0, 0, 0), "tensor `t` is too large");
    open_err(&one_tensor(&[u64::MAX - 31], 8, 0, 0), "tensor `t` is too large");
    // A large, representable tensor the file does not hold.
    open_err(&one_tensor(&[1 << 40], 0, 0, 64), "truncated: tensor `t`");
    // Zero or five dimensions.
    open_err(&one_tensor(&[], 0, 0, 0), "has 0 dimensions");
    open_err(&one_tensor(&[1, 1, 1, 1, 1], 0, 0, 0), "has 5 dimensions");
}

#[test]
fn counts_beyond_the_file_are_refused_before_allocating() {
    open_err(&header(0, u64::MAX), "the metadata count: a count of 18446744073709551615");
    open_err(&header(u64::MAX, 0), "the tensor count: a count of 18446744073709551615");
    open_err(&header(1 << 40, 0), "exceeds the file");
    // Arrays: of u64 (8 bytes each), of strings (8 bytes at least), of arrays.
    for (ety, n, min) in [(10u32, 1000u64, 8u64), (8, u64::MAX / 8 + 1, 8), (9, 1 << 50, 12), (0, 100, 1)] {
        let mut out = header(0, 1);
        gstr(&mut out, "a");
        out.extend(9u32.to_le_bytes());
        out.extend(ety.to_le_bytes());
        out.extend(n.to_le_bytes());
        out.extend([0u8; 16]);
        let e = open_err(&out, "exceeds the file");
        assert!(e.contains(&format!("a count of {n} (each at least {min} bytes)")), "{e}");
    }
    // Strings: a key and a value whose length runs past the file.
    let mut out = header(0, 1);
    out.extend(u64::MAX.to_le_bytes());
    out.extend([0u8; 16]);
    open_err(&out, "truncated: metadata key 0 needs 18446744073709551615 bytes");
    let mut out = header(0, 1);
    gstr(&mut out, "k");
    out.extend(8u32.to_le_bytes());
    out.extend((1u64 << 40).to_le_bytes());
    open_err(&out, "truncated: metadata `k`");
}

#[test]
fn malformed_metadata_is_refused() {
    // Unknown value type, unknown array element type, arrays nested too deeply.
    let mut out = header(0, 1);
    gstr(&mut out, "k");
    out.extend(99u32.to_le_bytes());
    open_err(&out, "unknown value type 99");
    let mut out = header(0, 1);
    gstr(&mut out, "k");
    out.extend(9u32.to_le_bytes());
    out.extend(77u32.to_le_bytes());
    out.extend(1u64.to_le_bytes());
    open_err(&out, "unknown array element type 77");
    let mut out = header(0, 1);
    gstr(&mut out, "k");
    out.extend(9u32.to_le_bytes());
    for _ in 0..8 {
        out.extend(9u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
    }
    out.extend([0u8; 64]);
    open_err(&out, "nested too deeply");
    // Alignment: not a power of two; the largest power of two puts every tensor past the end.
    for (align, needle) in [(3u32, "is not a power of two"), (1 << 31, "truncated: tensor `t`")] {
        let mut out = header(1, 1);
        gstr(&mut out, "general.alignment");
        out.extend(4u32.to_le_bytes());
        out.extend(align.to_le_bytes());
        tensor_info(&mut out, "t", &[4], 0, 0);
        out.extend([0u8; 64]);
        open_err(&out, needle);
    }
    // The same key or tensor twice.
    let mut out = header(0, 2);
    for _ in 0..2 {
        gstr(&mut out, "k");
        out.extend(4u32.to_le_bytes());
        out.extend(1u32.to_le_bytes());
    }
    open_err(&out, "metadata `k` appears twice");
    let mut out = header(2, 0);
    tensor_info(&mut out, "t", &[4], 0, 0);
    tensor_info(&mut out, "t", &[4], 0, 0);
    out.extend([0u8; 64]);
    open_err(&out, "tensor `t` appears twice");
}

/// A small valid file with metadata of several types and two tensors.
fn seed_file() -> Vec<u8> {
    let mut out = header(2, 3);
    gstr(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    gstr(&mut out, "llama");
    gstr(&mut out, "list");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    gstr(&mut out, "a");
    gstr(&mut out, "bc");
    gstr(&mut out, "n");
    out.extend(10u32.to_le_bytes());
    out.extend(7u64.to_le_bytes());
    tensor_info(&mut out, "f", &[4, 2], 0, 0);
    tensor_info(&mut out, "q", &[32], 8, 32);
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend([0u8; 32]);
    out.extend([0u8; 34]);
    out
}

#[test]
fn every_truncation_and_many_corruptions_give_errors_not_panics() {
    let good = seed_file();
    let g = open(&good).unwrap();
    assert_eq!(g.tensors.len(), 2);
    // Every prefix is refused (the data section ends the file).
    let mut truncated = 0;
    for cut in 0..good.len() {
        match open(&good[..cut]) {
            Ok(_) => panic!("a file cut at {cut} of {} bytes opened", good.len()),
            Err(e) => truncated += e.to_string().contains("hostile.gguf") as usize,
        }
    }
    assert_eq!(truncated, good.len(), "every error names the file");
    // Deterministic corruptions: overwrite one to eight bytes with values that
    // make large or boundary numbers, then open and decode whatever opens.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..3000 {
        let mut b = good.clone();
        let at = (next() % b.len() as u64) as usize;
        let len = 1 + (next() % 8) as usize;
        let fill = [0x00, 0xFF, 0x7F, 0x80, 0x20, 0x01][(next() % 6) as usize];
        for x in b.iter_mut().skip(at).take(len) {
            *x = if next() % 4 == 0 { next() as u8 } else { fill };
        }
        match open(&b) {
            Ok(g) => {
                opened += 1;
                for t in &g.tensors {
                    let _ = g.dequantize(&t.name);
                    let _ = (t.numel(), t.shape());
                }
            }
            Err(e) => {
                assert!(e.to_string().contains("hostile.gguf"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(opened > 0 && refused > 0, "the corruptions exercised both paths: {opened} opened, {refused} refused");
}
