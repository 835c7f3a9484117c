//! Splitting a streamed body into lines, with a bound on a line's length.
//!
//! A watch stream is newline-delimited JSON that never ends by itself; a node (or anything
//! pretending to be one) could send bytes without a newline for ever. The buffer holds at most
//! one pending line of `line_bytes_max` bytes plus the chunk that completed it, and a longer
//! line is an error instead of unbounded memory.

/// A pending line grew past its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a line longer than {line_bytes_max} bytes")]
pub(crate) struct LineTooLong {
    pub(crate) line_bytes_max: usize,
}

/// Bytes received but not yet handed out as lines.
#[derive(Debug)]
pub(crate) struct LineBuffer {
    buf: Vec<u8>,
    /// Where the next line starts in `buf` (bytes before it were handed out).
    start: usize,
    /// Bytes from `start` up to here hold no newline.
    scanned: usize,
    line_bytes_max: usize,
}

impl LineBuffer {
    pub(crate) fn new(line_bytes_max: usize) -> LineBuffer {
        assert!(line_bytes_max > 0, "a line must be allowed some bytes");
        LineBuffer {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            line_bytes_max,
        }
    }

    /// Appends a received chunk (after dropping the lines already handed out).
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line, without its `\n` (nor a `\r` before it); `Ok(None)` until one
    /// is complete. A line (complete or pending) over the bound is an error.
    pub(crate) fn next_line(&mut self) -> Result<Option<&[u8]>, LineTooLong> {
        let too_long = LineTooLong {
            line_bytes_max: self.line_bytes_max,
        };
        let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
            self.scanned = self.buf.len();
            if self.buf.len() - self.start > self.line_bytes_max {
                return Err(too_long);
            }
            return Ok(None);
        };
        let end = self.scanned + at;
        let begin = self.start;
        self.start = end + 1;
        self.scanned = self.start;
        let mut line = &self.buf[begin..end];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.len() > self.line_bytes_max {
            return Err(too_long);
        }
        Ok(Some(line))
    }

    /// Forgets everything (a new connection starts on a line boundary).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
    }

    /// Bytes held (handed-out lines not yet dropped included).
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &mut LineBuffer) -> Result<Vec<String>, LineTooLong> {
        let mut out = Vec::new();
        while let Some(line) = b.next_line()? {
            out.push(String::from_utf8(line.to_vec()).unwrap());
        }
        Ok(out)
    }

    #[test]
    fn lines_split_across_chunks_come_out_whole() {
        let mut b = LineBuffer::new(16);
        b.push(b"one\ntw");
        assert_eq!(drain(&mut b).unwrap(), ["one"]);
        b.push(b"o\r\n\nthr");
        assert_eq!(drain(&mut b).unwrap(), ["two", ""]);
        b.push(b"ee");
        assert_eq!(drain(&mut b).unwrap(), Vec::<String>::new());
        b.push(b"\n");
        assert_eq!(drain(&mut b).unwrap(), ["three"]);
        b.push(b"x");
        assert_eq!(
            b.held_bytes(),
            1,
            "handed-out lines are dropped on the next push"
        );
        b.clear();
        b.push(b"y\n");
        assert_eq!(drain(&mut b).unwrap(), ["y"]);
    }

    #[test]
    fn a_line_over_the_bound_is_an_error_complete_or_not() {
        let mut b = LineBuffer::new(4);
        b.push(b"1234\n12345\n");
        assert_eq!(b.next_line().unwrap(), Some(&b"1234"[..]));
        assert_eq!(b.next_line(), Err(LineTooLong { line_bytes_max: 4 }));
        let mut b = LineBuffer::new(4);
        for _ in 0..4 {
            b.push(b"1");
            assert_eq!(b.next_line().unwrap(), None);
        }
        b.push(b"1");
        assert!(
            b.next_line().is_err(),
            "five bytes pending without a newline"
        );
        assert!(b.held_bytes() <= 5);
    }

    #[test]
    fn any_chunking_gives_the_same_lines() {
        let text = b"{\"a\":1}\n\n{\"b\":22}\r\nlast\n";
        for cut in 1..text.len() {
            let mut b = LineBuffer::new(64);
            let mut got = Vec::new();
            for piece in text.chunks(cut) {
                b.push(piece);
                got.extend(drain(&mut b).unwrap());
            }
            assert_eq!(got, ["{\"a\":1}", "", "{\"b\":22}", "last"], "cut {cut}");
        }
    }
}
