//! The gateway's chunked decoder (src/cgi/chunked.rs, compiled from the very
//! file), read with buffer sizes that vary with the input, and the encoder's
//! output decoded back.
#![no_main]
#![allow(dead_code)]

use std::io::{BufReader, Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;

#[path = "../../src/cgi/chunked.rs"]
mod chunked;

fuzz_target!(|data: &[u8]| {
    let body = data;
    // The input's length picks the socket buffer and read sizes (so the
    // seeds are plain chunked bodies): tiny ones, which split every line
    // and chunk, for short inputs; for longer ones those of a socket.
    let sizes = (data.len() % 251) as u8;
    let (cap, step) = if data.len() <= 1024 {
        (
            1 + (sizes & 0x0f) as usize * 7,
            1 + (sizes >> 4) as usize * 97,
        )
    } else {
        (8192, 64 * 1024)
    };
    let mut dec = chunked::ChunkedReader::new(BufReader::with_capacity(cap, Cursor::new(body)));
    let mut out = Vec::new();
    let mut buf = vec![0u8; step];
    let ok = loop {
        match dec.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                assert!(n <= step);
                out.extend_from_slice(&buf[..n]);
            }
            Err(_) => break false,
        }
    };
    // Decoding never makes a body larger than its encoding.
    assert!(out.len() <= body.len());
    if ok {
        // Re-encoded, it decodes to the same bytes.
        let mut w = chunked::ChunkedWriter::new(Vec::new());
        for part in out.chunks(step) {
            w.write_all(part).expect("writing to a Vec");
        }
        let enc = w.finish().expect("writing to a Vec");
        let mut back = Vec::new();
        chunked::ChunkedReader::new(Cursor::new(&enc))
            .read_to_end(&mut back)
            .expect("the encoder's output decodes");
        assert_eq!(back, out);
    }
});
