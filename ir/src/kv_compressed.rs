//! What a compressed KV cache's layout tells its appender (the CPU runtime's
//! and, through it, the CUDA session's), whichever family it is: chunked SVD
//! (`kv_chunked`) or sequence-axis DCT or PSWF (`kv_sequence`). Both keep a ring of
//! exact f32 rows (after the sinks, if any) and then one record per group of
//! positions (a chunk, a block), written once the group's last position
//! arrives; this enum answers the questions that append, the call limit and
//! going back ask of either.

use crate::kv_chunked::ChunkLayout;
use crate::kv_sequence::SeqLayout;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compressed {
    Chunked(ChunkLayout),
    Sequence(SeqLayout),
}

impl Compressed {
    /// How reports name the family (`chunked-SVD`, `sequence-axis DCT`).
    pub fn name(&self) -> &'static str {
        match self {
            Compressed::Chunked(_) => "chunked-SVD",
            Compressed::Sequence(l) => match l.basis {
                crate::kv_sequence::SeqBasis::Dct => "sequence-axis DCT",
                crate::kv_sequence::SeqBasis::Pswf { .. } => "sequence-axis PSWF",
            },
        }
    }

    /// Channels of a row.
    pub fn width(&self) -> usize {
        match self {
            Compressed::Chunked(l) => l.width(),
            Compressed::Sequence(l) => l.width,
        }
    }

    /// Exact rows held (the sinks' and the ring's).
    pub fn exact_rows(&self) -> usize {
        match self {
            Compressed::Chunked(l) => l.ring,
            Compressed::Sequence(l) => l.sinks + l.ring,
        }
    }

    /// The exact row of position `t`.
    pub fn exact_row(&self, t: usize) -> usize {
        match self {
            Compressed::Chunked(l) => l.ring_row(t),
            Compressed::Sequence(l) => l.exact_row(t),
        }
    }

    /// Positions of the ring: how far back its exact rows reach.
    pub fn ring(&self) -> usize {
        match self {
            Compressed::Chunked(l) => l.ring,
            Compressed::Sequence(l) => l.ring,
        }
    }

    /// The most rows one call may append.
    pub fn max_call(&self) -> usize {
        match self {
            Compressed::Chunked(l) => l.max_call(),
            Compressed::Sequence(l) => l.max_call(),
        }
    }

    /// Positions per record.
    pub fn group(&self) -> usize {
        match self {
            Compressed::Chunked(l) => l.chunk,
            Compressed::Sequence(l) => l.block,
        }
    }

    /// The record position `t` completes, if it is its group's last.
    pub fn completed_by(&self, t: usize) -> Option<usize> {
        let (first, n) = match self {
            Compressed::Chunked(l) => (0, l.chunk),
            Compressed::Sequence(l) => (l.sinks, l.block),
        };
        (t >= first && (t + 1 - first).is_multiple_of(n)).then(|| (t - first) / n)
    }

    /// The first position of record `i`.
    pub fn first(&self, i: usize) -> usize {
        match self {
            Compressed::Chunked(l) => i * l.chunk,
            Compressed::Sequence(l) => l.sinks + i * l.block,
        }
    }

    /// Bytes of one record.
    pub fn record_bytes(&self) -> usize {
        match self {
            Compressed::Chunked(l) => l.chunk_bytes(),
            Compressed::Sequence(l) => l.block_bytes(),
        }
    }

    /// Where record `i` starts, in bytes from the buffer's start.
    pub fn record_at(&self, i: usize) -> usize {
        let exact = match self {
            Compressed::Chunked(l) => l.residual_bytes(),
            Compressed::Sequence(l) => l.exact_bytes(),
        };
        exact + i * self.record_bytes()
    }

    /// Bytes a cache of `positions` positions takes (`None` on overflow).
    pub fn bytes(&self, positions: usize) -> Option<usize> {
        match self {
            Compressed::Chunked(l) => l.bytes(positions),
            Compressed::Sequence(l) => l.bytes(positions),
        }
    }

    /// The first position whose exact row the query at `pos` reads (its own
    /// chunk's first; the first of its recent positions not read low-pass).
    pub fn exact_from(&self, pos: usize) -> usize {
        match self {
            Compressed::Chunked(l) => pos / l.chunk * l.chunk,
            Compressed::Sequence(l) => l.sinks + l.read_blocks(pos) * l.block,
        }
    }

    /// Writes the record of a group's `group() × width()` exact rows into
    /// `record` (`record_bytes`); `None` if the sizes do not fit or it does
    /// not factor.
    pub fn encode(&self, rows: &[f32], record: &mut [u8]) -> Option<()> {
        match self {
            Compressed::Chunked(l) => l.factor_into(rows, record),
            Compressed::Sequence(l) => l.compress_into(rows, record),
        }
    }
}
