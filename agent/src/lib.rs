//! Host agent: the only crate that touches udev, sysfs and libvirt. (Built in issue 3.)
