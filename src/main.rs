//! cgipool: CGI-style process pools as systemd units behind nginx.
mod config;
mod render;

fn main() {}
