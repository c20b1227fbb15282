//! Packs the agent's relative relocations (DT_RELR) when the target's glibc can load them.
//!
//! A position-independent binary carries a relocation per pointer in its read-only data (vtables,
//! string tables): 24 bytes each on 64-bit, 0.27 MiB for the agent, which the loader reads at start
//! and which then stay resident. DT_RELR packs them into a bitmap of a few KiB. glibc loads it from
//! 2.36 (Debian 12, Raspberry Pi OS bookworm, Ubuntu 22.10); the linker then records the version
//! `GLIBC_ABI_DT_RELR`, so an older glibc refuses the binary by name instead of misloading it. The
//! packing is used only when the glibc the agent is built against has that version and the
//! target's linker packs (GNU ld 2.40, Debian 12's, ignores the option for ARM with a warning): a
//! build on or for an older system gets the usual relocations. `TRIBUTARY_PACK_RELOCS=0` turns it
//! off.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TRIBUTARY_PACK_RELOCS");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os != "linux" || env != "gnu" || std::env::var("TRIBUTARY_PACK_RELOCS").is_ok_and(|v| v == "0") {
        return;
    }
    // The target's C compiler, the one cc-rs picks (as for SQLite); for the ARM targets it is also
    // the linker (.cargo/config.toml).
    let Ok(compiler) = cc::Build::new().cargo_metadata(false).cargo_warnings(false).try_get_compiler() else {
        return;
    };
    let Some(libc) = target_libc(compiler.path()) else { return };
    println!("cargo:rerun-if-changed={}", libc.display());
    if std::fs::read(&libc).is_ok_and(|bytes| contains(&bytes, b"GLIBC_ABI_DT_RELR")) && linker_packs(compiler.path()) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The `libc.so.6` the compiler links against.
fn target_libc(compiler: &Path) -> Option<PathBuf> {
    let out = Command::new(compiler).arg("-print-file-name=libc.so.6").output().ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // A compiler that does not know the file prints the bare name back.
    path.is_absolute().then_some(path)
}

/// Whether the compiler's linker packs relocations: it links a program that has one, and the
/// result must have a `.relr.dyn` section.
fn linker_packs(compiler: &Path) -> bool {
    let Some(out_dir) = std::env::var_os("OUT_DIR").map(PathBuf::from) else { return false };
    let (source, program) = (out_dir.join("relr-probe.c"), out_dir.join("relr-probe"));
    let probe = "static int x; int *const p = &x; int main(void) { return *p; }\n";
    if std::fs::write(&source, probe).is_err() {
        return false;
    }
    let linked = Command::new(compiler)
        .args(["-fPIE", "-pie", "-Wl,-z,pack-relative-relocs", "-o"])
        .arg(&program)
        .arg(&source)
        .output()
        .is_ok_and(|out| out.status.success());
    linked && std::fs::read(&program).is_ok_and(|bytes| contains(&bytes, b".relr.dyn"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
