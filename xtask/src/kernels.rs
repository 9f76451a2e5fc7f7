//! Debian distribution kernels for the kernel matrix: found, downloaded and unpacked with a
//! private apt configuration (the machine's sources stay untouched), cached in
//! `~/.cache/flannel-rs/kernels/<release>/` with `depmod` run, so virtme-ng can boot the image
//! and `modprobe` works inside the guest.
//!
//! Which build: the newest `linux-image-<series>-N-amd64` the Debian suites offer at the time a
//! series is first fetched; after that the cached one is used, without network, until
//! `~/.cache/flannel-rs/kernels` is removed (then the next run picks the newest again). Pinning
//! exact versions would not stay reproducible: the security suites drop superseded builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup_ebpf::cache_dir;
use crate::workspace::run;

/// A kernel series of the matrix and how its Debian image package is named:
/// `linux-image-<prefix><N><suffix>` with N digits only (no -cloud, -rt, -dbg, -unsigned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// What `--kernel` takes.
    pub name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    /// Where Debian ships it (for messages).
    pub suite: &'static str,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        prefix: "5.10.0-",
        suffix: "-amd64",
        suite: "bullseye",
    },
    Series {
        name: "6.1",
        prefix: "6.1.0-",
        suffix: "-amd64",
        suite: "bookworm",
    },
    Series {
        name: "6.12",
        prefix: "6.12.",
        suffix: "+deb12-amd64",
        suite: "bookworm, linux-6.12",
    },
];

/// The private apt configuration's sources: the suites that carry the three series.
const SOURCES: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bullseye main
deb http://deb.debian.org/debian-security bullseye-security main
";

pub fn series(name: &str) -> Option<Series> {
    SERIES.iter().copied().find(|s| s.name == name)
}

impl Series {
    /// `N` of a package name of this series, `None` for other packages.
    fn build_number(&self, package: &str) -> Option<u64> {
        let n = package
            .strip_prefix("linux-image-")?
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n.parse().ok()
    }

    /// The newest package of this series among `packages` (`apt-cache pkgnames` output).
    fn newest<'a>(&self, packages: impl Iterator<Item = &'a str>) -> Option<&'a str> {
        packages
            .filter_map(|p| Some((self.build_number(p)?, p)))
            .max_by_key(|(n, _)| *n)
            .map(|(_, p)| p)
    }

    /// The file that records which release of this series the cache holds.
    fn marker(&self) -> Result<PathBuf> {
        Ok(kernels_dir()?.join(format!("{}.release", self.name)))
    }
}

/// An unpacked kernel: the image virtme-ng boots, its modules beside it.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: Series,
    /// `uname -r` of the guest, e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The Debian package version it came from, e.g. `6.1.192-3`.
    pub version: String,
    /// `<dir>/boot/vmlinuz-<release>`, `<dir>/lib/modules/<release>`.
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join(format!("boot/vmlinuz-{}", self.release))
    }

    /// Proves the cached kernel usable: the image is there and depmod's index resolves a
    /// module the tests load (what `modprobe` inside the guest relies on).
    fn check(&self) -> Result<()> {
        if !self.vmlinuz().is_file() {
            bail!("{} is missing", self.vmlinuz().display());
        }
        let out = Command::new("modinfo")
            .arg("-b")
            .arg(&self.dir)
            .args(["-k", &self.release, "-F", "filename", "veth"])
            .output()
            .context("running modinfo (Debian package kmod)")?;
        if !out.status.success() {
            bail!(
                "modinfo -b {} -k {} veth fails: {}",
                self.dir.display(),
                self.release,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// `~/.cache/flannel-rs/kernels`: on the shared root, so the guest sees it (not /tmp, /var/cache,
/// /var/tmp or /run, which are fresh tmpfs mounts inside the VM).
pub fn kernels_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("kernels"))
}

/// The private apt state: sources, lists and archives of the kernel downloads.
fn apt_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("kernel-apt"))
}

/// The series' kernel from the cache, fetching and unpacking it first if the cache has none.
pub fn ensure(series: Series) -> Result<Kernel> {
    if let Some(k) = cached(series)? {
        if k.check().is_ok() {
            return Ok(k);
        }
        eprintln!(
            "kernel {} in {} is incomplete: fetching it again",
            k.release,
            k.dir.display()
        );
    }
    let k = fetch(series).with_context(|| {
        format!(
            "setup failed: Debian kernel {} ({}) could not be fetched",
            series.name, series.suite
        )
    })?;
    k.check().with_context(|| {
        format!(
            "setup check failed: Debian kernel {} ({}) is not usable",
            series.name, k.release
        )
    })?;
    Ok(k)
}

fn cached(series: Series) -> Result<Option<Kernel>> {
    let Ok(text) = std::fs::read_to_string(series.marker()?) else {
        return Ok(None);
    };
    let mut words = text.split_whitespace();
    let (Some(release), Some(version)) = (words.next(), words.next()) else {
        return Ok(None);
    };
    Ok(Some(Kernel {
        series,
        release: release.to_owned(),
        version: version.to_owned(),
        dir: kernels_dir()?.join(release),
    }))
}

/// `apt-get`/`apt-cache` reading only the private configuration.
fn apt(tool: &str) -> Result<Command> {
    let dir = apt_dir()?;
    let mut cmd = Command::new(tool);
    cmd.arg(format!(
        "-o=Dir::Etc::sourcelist={}",
        dir.join("sources.list").display()
    ))
    .arg("-o=Dir::Etc::sourceparts=/dev/null")
    .arg(format!(
        "-o=Dir::State::Lists={}",
        dir.join("lists").display()
    ))
    .arg(format!("-o=Dir::Cache={}", dir.join("cache").display()))
    // The private dirs belong to root, not to apt's sandbox user `_apt`.
    .arg("-o=APT::Sandbox::User=root")
    // Only the package lists: no translations, no AppStream metadata.
    .arg("-o=Acquire::Languages=none")
    .arg("-o=Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false")
    .arg("-o=Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false")
    .arg("-o=Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false");
    Ok(cmd)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fetch(series: Series) -> Result<Kernel> {
    let apt_dir = apt_dir()?;
    for d in ["lists/partial", "cache/archives/partial", "debs"] {
        std::fs::create_dir_all(apt_dir.join(d))
            .with_context(|| format!("creating {}", apt_dir.join(d).display()))?;
    }
    std::fs::write(apt_dir.join("sources.list"), SOURCES)?;
    run(apt("apt-get")?.args(["update", "-qq"]))?;
    let names = output(apt("apt-cache")?.args(["pkgnames", "linux-image-"]))?;
    let Some(package) = series.newest(names.lines().map(str::trim)) else {
        bail!(
            "no linux-image-{}N{} package in the Debian suites",
            series.prefix,
            series.suffix
        );
    };
    let package = package.to_owned();
    let release = package["linux-image-".len()..].to_owned();
    let version = output(apt("apt-cache")?.args(["show", "--no-all-versions", &package]))?
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .map(str::to_owned)
        .with_context(|| format!("apt-cache show {package}: no Version"))?;
    eprintln!("kernel {}: downloading {package} {version}", series.name);
    let debs = apt_dir.join("debs");
    clear_dir(&debs)?;
    run(apt("apt-get")?
        .args(["download", "-qq", &format!("{package}={version}")])
        .current_dir(&debs))?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;

    let dir = kernels_dir()?.join(&release);
    std::fs::create_dir_all(&dir)?;
    // Unpacked in place: a run that stopped half way is simply unpacked over again.
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
    std::fs::remove_file(&deb)?;
    let kernel = Kernel {
        series,
        release,
        version,
        dir,
    };
    kernel.check()?;
    write_marker(&kernel)?;
    Ok(kernel)
}

fn clear_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        std::fs::remove_file(e.path())?;
    }
    Ok(())
}

/// Written last: only a kernel that was unpacked and indexed completely is used from the cache.
fn write_marker(k: &Kernel) -> Result<()> {
    let marker = k.series.marker()?;
    let tmp = marker.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}\n", k.release, k.version))?;
    std::fs::rename(&tmp, &marker)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_plain_amd64_image_of_each_series() {
        let names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-57-amd64",
            "linux-image-6.1.0-58-cloud-amd64",
            "linux-image-6.1.0-58-amd64-dbg",
            "linux-image-6.1.0-58-amd64-unsigned",
            "linux-image-6.1.0-58-rt-amd64",
            "linux-image-6.12.118+deb12-amd64",
            "linux-image-6.12.9+deb12-amd64",
            "linux-image-6.12.120+deb12-cloud-amd64",
            "linux-image-5.10.0-46-amd64",
            "linux-image-5.10.0-100-amd64",
            "linux-image-amd64",
        ];
        let newest = |n| series(n).unwrap().newest(names.iter().copied());
        assert_eq!(newest("6.1"), Some("linux-image-6.1.0-57-amd64"));
        assert_eq!(newest("6.12"), Some("linux-image-6.12.118+deb12-amd64"));
        assert_eq!(newest("5.10"), Some("linux-image-5.10.0-100-amd64"));
    }
}
