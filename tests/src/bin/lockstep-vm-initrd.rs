//! Writes the protected test VM's initramfs (tests/src/guest/vm.rs: busybox, the prepared
//! modules, the counter program) into a directory and prints its path and the kernel's, for
//! bench/vm.py. Runs tests/guest/prepare first (once per machine, cached).
//!
//! `lockstep-vm-initrd DIR` prints `initrd=PATH` and `kernel=PATH`.

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: lockstep-vm-initrd DIR");
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).expect("directory");
    let initrd = lockstep_tests::guest::vm::vm_initrd(dir);
    println!("initrd={}", initrd.display());
    println!(
        "kernel={}",
        lockstep_tests::guest::prepared().kernel.display()
    );
}
