# amiprep in a Packer build: install the agent, then run
# `amiprep-agent prepare` as the LAST provisioner. Documented in
# docs/INSTALL.md ("Packer"). No controller is involved: `prepare` cleans the
# build instance (packages, services, logs, temp, user traces, identity) and
# scans it for credentials; it exits 1 when the host is not ready, which
# fails the build, so no image is made from a dirty host.
#
# Merge the provisioners into your own build; keep the prepare step last, so
# that nothing writes to the host after it (Packer stops the instance and
# creates the AMI through the EC2 API, over no further SSH commands).

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "amiprep_agent_deb" {
  type        = string
  description = "Local path of the amiprep-agent .deb (scripts/package)"
  default     = "target/packages/amiprep-agent_0.1.0-1_amd64.deb"
}

source "amazon-ebs" "debian" {
  region        = var.region
  instance_type = "t3.small"
  ssh_username  = "admin"
  ami_name      = "web-{{timestamp}}"
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"] # Debian
    most_recent = true
  }
  imds_support = "v2.0"
}

build {
  sources = ["source.amazon-ebs.debian"]

  # ... your own provisioners go here ...

  provisioner "file" {
    source      = var.amiprep_agent_deb
    destination = "/tmp/amiprep-agent.deb"
  }

  provisioner "shell" {
    inline = [
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y /tmp/amiprep-agent.deb",
      "rm -f /tmp/amiprep-agent.deb",
    ]
  }

  # Last: hygiene and the secret gate. Exit 0 = ready; anything else fails
  # the build before the AMI is created.
  provisioner "shell" {
    inline = ["sudo /usr/bin/amiprep-agent prepare"]
  }
}
