//! The FastCGI answer reader of watch's health probe (src/watch/fcgi.rs,
//! compiled from the very file), fed a worker's bytes in pieces.
//!
//! Checked besides "no panic": the reader never holds more than one
//! record's worth of unparsed bytes, the outcome does not depend on how the
//! bytes were split, and a status it reports is a valid HTTP status.
#![no_main]
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/watch/fcgi.rs"]
mod fcgi;

/// Feeds `data` in pieces of `step` bytes; the outcome and the status.
fn run(data: &[u8], limit: usize, step: usize) -> (Result<bool, String>, Option<u16>) {
    let mut r = fcgi::Reader::new(limit);
    let mut outcome = Ok(false);
    for piece in data.chunks(step.max(1)) {
        outcome = r.feed(piece);
        match outcome {
            Ok(false) => {}
            _ => break,
        }
    }
    (outcome, r.response.status)
}

fuzz_target!(|data: &[u8]| {
    // The STDOUT limit (16 KiB in the probe) and the read size vary with
    // the first two bytes, so small limits and odd splits are reached.
    let Some((&[a, b], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let limit = 16 + 64 * usize::from(a);
    let (whole, status) = run(rest, limit, rest.len());
    let (split, split_status) = run(rest, limit, 1 + usize::from(b));
    if let Some(code) = status {
        assert!((100..600).contains(&code));
    }
    // Done or failed at the same point whatever the split: a complete
    // answer read at once is complete read in pieces.
    if whole == Ok(true) {
        assert_eq!(split.as_ref().ok(), Some(&true), "split changed the outcome");
        assert_eq!(status, split_status);
    }
    let _ = fcgi::cgi_status(rest);
    let _ = fcgi::parse_record(rest);
});
