//! A bounds-checked cursor. Every read names the field it is for, so a short buffer
//! turns into an error that says which field ran off the end, and where.

use crate::error::ErrorKind;

/// Reads big-endian values from `buf`; `base` is the offset of `buf[0]` in the message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

/// A short read: which field, where it started, how many bytes it needed.
pub(crate) struct Short {
    pub field: &'static str,
    pub offset: usize,
    pub kind: ErrorKind,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    /// Offset in the message of the next byte to read.
    pub(crate) fn offset(&self) -> usize {
        self.base + self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Short> {
        if self.remaining() < n {
            return Err(Short {
                field,
                offset: self.offset(),
                kind: ErrorKind::Truncated {
                    needed: n,
                    available: self.remaining(),
                },
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, Short> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, Short> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, Short> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}
