#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestbox_fuzz::targets::snapshot::run(data));
