from merger.command import merger

if __name__ == "__main__":
    merger()
