#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nestbox_fuzz::targets::virtio_net::run(data));
